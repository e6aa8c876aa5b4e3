"""``select``: the persistent "selected for backup" list.

The list holds concrete series: ``select add --patient P`` adds the series P
has now. Every operation that takes a selection takes ``--selected``.
"""
from __future__ import annotations

import argparse
import sys

import msgspec

from dicomvault.engine import Context, Database, Operation, Selection, UsageError, hookimpl
from dicomvault.engine.options import add_selection_options, selection_from


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["set", "add", "add-all", "remove", "clear", "show"])
    add_selection_options(p, whole=False, selected=False)


def _series(db: Database, selection: Selection) -> set[str]:
    return {se.series_uid for p, st, se in db.hierarchy() if selection.matches(p, st, se)}


def current(db: Database) -> set[str]:
    saved = db.get_selected()
    return _series(db, Selection(any_of=tuple(saved))) if saved else set()


def run(ctx: Context, args: argparse.Namespace) -> int:
    db = ctx.open_database()
    chosen = current(db)
    if args.action in ("set", "add", "remove"):
        picked = _series(db, selection_from(args, db))
        if not picked:
            raise UsageError("the selection matches nothing in the database")
        if args.action == "set":
            chosen = picked
        elif args.action == "add":
            chosen |= picked
        else:
            chosen -= picked
    elif args.action == "add-all":
        chosen = _series(db, Selection(whole=True))
    elif args.action == "clear":
        chosen = set()
    if args.action != "show":
        db.set_selected([Selection(series=tuple(sorted(chosen)))] if chosen else [])
    nodes = db.tree(Selection(series=tuple(sorted(chosen))), "series") if chosen else []
    if args.json:
        sys.stdout.write(msgspec.json.encode({"series": sorted(chosen), "tree": nodes}).decode() + "\n")
    else:
        n = sum(node.instances for node in nodes)
        print(f"selected for backup: {len(chosen)} series, {n} instances")
        for p in nodes:
            for st in p.children:
                for se in st.children:
                    print(f"  {se.label['modality'] or '??'} {se.uid}  [{se.instances} instances]")
    return 0


@hookimpl
def dicomvault_register_operations() -> list[Operation]:
    return [Operation(name="select", help="edit or show the persistent 'selected for backup' list",
                      configure=configure, run=run)]
