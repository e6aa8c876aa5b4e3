"""Command-line options shared by operations: selections and conflict
policies. Plugin operations use these to behave like the built-ins."""
from __future__ import annotations

import argparse
import datetime
import re

from .errors import UsageError
from .interfaces import Database
from .types import ConflictPolicy, Selection

_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")


def _date(value: str) -> str:
    if value == "":
        return ""  # the default: argparse passes string defaults through ``type`` too
    m = _DATE.match(value.strip())
    if m:
        try:
            datetime.date(*map(int, m.groups()))  # a real calendar day, not 2020-13-45
        except ValueError:
            m = None
    if not m:
        raise argparse.ArgumentTypeError(f"'{value}' is not a date (YYYYMMDD or YYYY-MM-DD)")
    return "".join(m.groups())


def add_selection_options(parser: argparse.ArgumentParser, *, whole: bool = True,
                          selected: bool = True) -> None:
    g = parser.add_argument_group("selection (values of one option are alternatives; "
                                  "different options narrow each other)")
    g.add_argument("--patient", action="append", default=[], metavar="PATIENT_ID",
                   help="a PatientID (or the patient key shown by 'ls --json')")
    g.add_argument("--study", action="append", default=[], metavar="UID", help="a Study Instance UID")
    g.add_argument("--series", action="append", default=[], metavar="UID", help="a Series Instance UID")
    g.add_argument("--modality", action="append", default=[], metavar="MOD", help="a modality, e.g. CT")
    g.add_argument("--date-from", type=_date, default="", metavar="DATE", help="study date on or after")
    g.add_argument("--date-to", type=_date, default="", metavar="DATE", help="study date on or before")
    if selected:
        g.add_argument("--selected", action="store_true",
                       help="the persistent 'selected for backup' list (see 'dicomvault select')")
    if whole:
        g.add_argument("--whole", action="store_true", help="everything")


def selection_from(args: argparse.Namespace, db: Database | None = None, *,
                   required: bool = True) -> Selection:
    """The selection the options describe. ``--selected`` reads ``db``'s list."""
    criteria = Selection(patients=tuple(args.patient), studies=tuple(args.study),
                         series=tuple(args.series), modalities=tuple(args.modality),
                         date_from=args.date_from, date_to=args.date_to)
    chosen = [name for name, on in (("--whole", getattr(args, "whole", False)),
                                    ("--selected", getattr(args, "selected", False)),
                                    ("a selection", not criteria.is_empty())) if on]
    if len(chosen) > 1:
        raise UsageError(f"give one of a selection, --selected or --whole, not {' and '.join(chosen)}")
    if getattr(args, "whole", False):
        return Selection(whole=True)
    if getattr(args, "selected", False):
        if db is None:
            raise UsageError("--selected needs a database")
        saved = db.get_selected()
        if not saved:
            raise UsageError("the 'selected for backup' list is empty (see 'dicomvault select')")
        return Selection(any_of=tuple(saved))
    if criteria.is_empty():
        if required:
            raise UsageError("say what to work on: a selection (--patient, --study, --series, "
                             "--modality, --date-from, --date-to), --selected or --whole")
        return Selection(whole=True)
    return criteria


def add_policy_option(parser: argparse.ArgumentParser, default: str = "skip") -> None:
    parser.add_argument("--on-conflict", choices=[p.value for p in ConflictPolicy], default=default,
                        help="when other content is stored under the same UID: skip it (reported), "
                             f"overwrite it, or fail before changing anything (default: {default})")


def policy_from(args: argparse.Namespace) -> ConflictPolicy:
    return ConflictPolicy(args.on_conflict)
