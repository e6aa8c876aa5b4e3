"""Registers the export targets and the ``export-dicom`` command.

Addresses: ``dicom-folder:OUTDIR`` and ``dicom-zip:FILE.zip``, with options
as a URL query: ``?dicomdir=1&layout=TEMPLATE&on-existing=skip&fileset-id=ID``.
"""
from __future__ import annotations

import argparse
import os
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

from dicomvault.engine import (
    ConflictError,
    Context,
    Event,
    Item,
    Kind,
    Operation,
    Report,
    UsageError,
    hookimpl,
    transfer,
)
from dicomvault.engine.options import add_selection_options, selection_from
from dicomvault.engine.passphrase import add_passphrase_options

from .layout import DEFAULT_TEMPLATE, DICOMDIR_TEMPLATE, FIELDS, Layout
from .options import ON_EXISTING, REPORT_NAME, Options

if TYPE_CHECKING:  # the targets import pydicom: loaded when an export runs, not at start-up
    from .target import FolderTarget
    from .zipout import ZipTarget

FOLDER = "dicom-folder:"
ZIP = "dicom-zip:"
_KEYS = {"dicomdir", "layout", "on-existing", "fileset-id"}


def parse_address(url: str) -> tuple[str, Options]:
    body = url.split(":", 1)[1]
    path, query = body, ""
    head, sep, tail = body.rpartition("?")
    if sep and tail and set(urllib.parse.parse_qs(tail, keep_blank_values=True)) <= _KEYS:
        path, query = head, tail
    q = {k: v[-1] for k, v in urllib.parse.parse_qs(query, keep_blank_values=True).items()}
    on_existing = q.get("on-existing", "skip")
    if on_existing not in ON_EXISTING:
        raise UsageError(f"on-existing must be one of {', '.join(ON_EXISTING)}")
    if not path:
        raise UsageError(f"'{url}' names no output")
    return path, Options(layout=q.get("layout", ""), dicomdir=q.get("dicomdir", "") in ("1", "true", "yes"),
                         on_existing=on_existing, fileset_id=q.get("fileset-id", "DICOMVAULT"))


def make_address(scheme: str, path: str, options: Options) -> str:
    q = {"on-existing": options.on_existing, "fileset-id": options.fileset_id}
    if options.dicomdir:
        q["dicomdir"] = "1"
    if options.layout:
        q["layout"] = options.layout
    return f"{scheme}{path}?{urllib.parse.urlencode(q)}"


def _open_folder(url: str, ctx: Context) -> FolderTarget:
    from .target import FolderTarget
    path, options = parse_address(url)
    return FolderTarget(path, options)


def _open_zip(url: str, ctx: Context) -> ZipTarget:
    from .zipout import ZipTarget
    path, options = parse_address(url)
    return ZipTarget(path, options)


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUTDIR", help="the folder to write (with --zip: the zip file)")
    p.add_argument("--from", dest="source", metavar="URL",
                   help="where to read from: a .bkp file or any source (default: the database, --db)")
    add_selection_options(p)
    add_passphrase_options(p)
    p.add_argument("--layout", default="", metavar="TEMPLATE",
                   help="folder and file names, e.g. '{PatientID}/{StudyDate}/{SeriesNumber}/"
                        "{InstanceNumber:05}.dcm' (default: '" + DEFAULT_TEMPLATE + "'; with --dicomdir: '"
                        + DICOMDIR_TEMPLATE + "'); fields: " + ", ".join(FIELDS))
    p.add_argument("--dicomdir", action="store_true",
                   help="DICOM media: conformant File IDs, Explicit VR Little Endian, and a DICOMDIR")
    p.add_argument("--zip", action="store_true", help="write one zip file (OUTDIR, '.zip' added if missing)")
    p.add_argument("--on-existing", choices=ON_EXISTING, default="skip",
                   help="when a file is already there with other content: leave it (reported), "
                        "overwrite it, write under a new name, or fail before writing anything")
    p.add_argument("--fileset-id", default="DICOMVAULT", metavar="ID",
                   help="the DICOMDIR's File-set ID (made conformant: up to 16 of A-Z 0-9 _ space)")


def _preflight(source: object, selection: object, root: Path, options: Options) -> None:
    """``--on-existing fail``: check every destination before writing anything."""
    layout = Layout(options.template(), dicom_file_ids=options.dicomdir)
    clashes = [n for n in ("DICOMDIR", REPORT_NAME) if (root / n).exists()
               and (n != "DICOMDIR" or options.dicomdir)]
    for it in source.instances(selection):  # type: ignore[attr-defined]
        if isinstance(it, Item):
            rel = layout.path(it)
            if os.path.lexists(root.joinpath(*rel)):
                # named by instance UID: the layout may put patient names in the path
                clashes.append(f"the file of instance {it.instance.sop_uid}")
    if clashes:
        shown = ", ".join(clashes[:5]) + (f" and {len(clashes) - 5} more" if len(clashes) > 5 else "")
        raise ConflictError(f"{len(clashes)} file(s) already exist in {root} ({shown}); nothing was "
                            "written (--on-existing fail)")


def _run(ctx: Context, args: argparse.Namespace) -> Report:
    options = Options(layout=args.layout, dicomdir=args.dicomdir, on_existing=args.on_existing,
                      fileset_id=args.fileset_id)
    Layout(options.template(), dicom_file_ids=options.dicomdir)  # a bad template is a usage error, now
    db = ctx.open_database() if args.source is None or args.selected else None
    selection = selection_from(args, db)
    source = db.source() if args.source is None and db is not None else ctx.open_source(args.source)
    try:
        if args.zip:
            out = args.output if args.output.lower().endswith(".zip") else args.output + ".zip"
            url = make_address(ZIP, out, options)
        else:
            out = args.output
            if options.on_existing == "fail":
                _preflight(source, selection, Path(out).expanduser().absolute(), options)
            url = make_address(FOLDER, out, options)
        target = ctx.open_target(url)
        report = transfer(ctx, source, target, selection, operation="export-dicom")
    finally:
        source.close()
    for line in getattr(target, "warnings", []):
        report.warnings.append(line)
        ctx.emit(Event(kind="warning", operation="export-dicom", reason=line))
    report.details["output"] = str(getattr(target, "final", out))
    report.details["report"] = REPORT_NAME
    if options.dicomdir:
        report.details["dicomdir"] = "DICOMDIR"
    report.details["from"] = source.description
    return report


@hookimpl
def dicomvault_register_targets() -> list[Kind]:
    return [
        Kind(name="dicom-folder", description="DICOM files in a folder, optionally with a DICOMDIR "
             "(dicom-folder:OUTDIR[?dicomdir=1&layout=...&on-existing=...])",
             matches=lambda u: u.startswith(FOLDER), open=_open_folder),
        Kind(name="dicom-zip", description="DICOM files in a zip, optionally with a DICOMDIR "
             "(dicom-zip:FILE.zip[?dicomdir=1&layout=...])",
             matches=lambda u: u.startswith(ZIP), open=_open_zip),
    ]


@hookimpl
def dicomvault_register_operations() -> list[Operation]:
    return [Operation(name="export-dicom", help="write a selection as DICOM files into a folder or a "
                      "zip, with a readable layout or as DICOM media with a DICOMDIR",
                      configure=_configure, run=_run)]
