"""``compare``: check that another database or a .bkp holds exactly what the
database holds for a selection: every instance's bytes (re-hashed with
SHA-256), its place in the hierarchy, its attributes and attachments."""
from __future__ import annotations

import argparse
import hashlib

from dicomvault.engine import Context, Event, Item, Operation, Report, Selection, Source, hookimpl
from dicomvault.engine.options import add_selection_options, selection_from
from dicomvault.engine.passphrase import add_passphrase_options
from dicomvault.engine.types import Outcome

CHUNK = 1 << 20


def _sha(open_: object) -> str:
    digest = hashlib.sha256()
    with open_() as fh:  # type: ignore[operator]
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# "the other": the database or .bkp given to compare, against --db (or the first source)
MISSING = "missing in the other"
EXTRA = "only in the other (unexpected extra)"


def _catalogue(source: Source, selection: Selection) -> tuple[dict, dict, dict]:  # type: ignore[type-arg]
    items = {it.instance.sop_uid: it for it in source.instances(selection) if isinstance(it, Item)}
    attrs = {(a.level, a.uid): a for a in source.attributes(selection)}
    atts = {rec.attachment_id: (rec, op) for rec, op in source.attachments(selection)}
    return items, attrs, atts


def compare(expected: Source, actual: Source, selection: Selection, *, rehash: bool = True) -> Report:
    """Report one ``instance``/``attributes``/``attachment`` outcome per
    entity of ``expected``: unchanged when ``actual`` holds the same, failed
    with the difference otherwise."""
    report = Report(operation="compare")
    exp_items, exp_attrs, exp_atts = _catalogue(expected, selection)
    act_items, act_attrs, act_atts = _catalogue(actual, selection)
    for uid, it in exp_items.items():
        other = act_items.get(uid)
        if other is None:
            report.add("instance", Outcome.FAILED, uid, MISSING)
            continue
        diffs = [name for name, a, b in (
            ("record", it.instance, other.instance), ("series", it.series, other.series),
            ("study", it.study, other.study), ("patient", it.patient, other.patient)) if a != b]
        if not diffs and rehash:
            if _sha(other.open) != it.instance.sha256:
                diffs.append("bytes (SHA-256)")
        if diffs:
            report.add("instance", Outcome.FAILED, uid, "differs in the other: " + ", ".join(diffs))
        else:
            report.add("instance", Outcome.UNCHANGED, uid, size=it.instance.size)
    for uid in act_items.keys() - exp_items.keys():
        report.add("instance", Outcome.FAILED, uid, EXTRA)
    for key, attrs in exp_attrs.items():
        theirs = act_attrs.get(key)
        why = MISSING if theirs is None else "" if theirs == attrs else "differs in the other"
        report.add("attributes", Outcome.FAILED if why else Outcome.UNCHANGED, f"{key[0]} {key[1]}", why)
    for key in act_attrs.keys() - exp_attrs.keys():
        report.add("attributes", Outcome.FAILED, f"{key[0]} {key[1]}", EXTRA)
    for aid, (rec, _op) in exp_atts.items():
        other_att = act_atts.get(aid)
        if other_att is None:
            why = MISSING
        elif other_att[0] != rec:
            why = "differs in the other: record"
        elif rehash and _sha(other_att[1]) != rec.sha256:
            why = "differs in the other: bytes (SHA-256)"
        else:
            why = ""
        report.add("attachment", Outcome.FAILED if why else Outcome.UNCHANGED, aid, why)
    for aid in act_atts.keys() - exp_atts.keys():
        report.add("attachment", Outcome.FAILED, aid, EXTRA)
    return report


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("other", metavar="URL", help="another database or a .bkp file")
    add_selection_options(p)
    add_passphrase_options(p)


def run(ctx: Context, args: argparse.Namespace) -> Report:
    db = ctx.open_database()
    selection = selection_from(args, db, required=False)
    mine, other = db.source(), ctx.open_source(args.other)
    try:
        report = compare(mine, other, selection)
    finally:
        mine.close()
        other.close()
    report.details["identical instances"] = report.count(Outcome.UNCHANGED, "instance")
    for p in report.problems:  # named one per line on stderr, as the other commands do
        ctx.emit(Event(kind="item", operation="compare", item=p.item, what=p.what,  # type: ignore[arg-type]
                       outcome=p.outcome, reason=p.reason, size=0))
    return report


@hookimpl
def dicomvault_register_operations() -> list[Operation]:
    return [Operation(name="compare", help="check that another database or a .bkp holds exactly the same "
                      "instances, attributes and attachments", configure=configure, run=run)]
