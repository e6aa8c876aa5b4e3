"""``ls``: patients, studies and series with counts and sizes; instances
with their size and SHA-256 at ``--level instance``."""
from __future__ import annotations

import argparse
import sys

import msgspec

from dicomvault.engine import Context, Operation, TreeNode, hookimpl
from dicomvault.engine.options import add_selection_options, selection_from


def configure(p: argparse.ArgumentParser) -> None:
    add_selection_options(p)
    p.add_argument("--level", choices=["patient", "study", "series", "instance"], default="series",
                   help="how deep to show (default: series)")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n:.1f} TB"


def _prune(nodes: list[TreeNode], depth: str) -> list[TreeNode]:
    order = ["patient", "study", "series", "instance"]
    for node in nodes:
        if order.index(node.level) >= order.index(depth):
            node.children = []
        else:
            _prune(node.children, depth)
    return nodes


def _print(nodes: list[TreeNode], indent: int = 0) -> None:
    out = sys.stdout
    for n in nodes:
        pad = "  " * indent
        lab = n.label
        if n.level == "patient":
            head = f"PATIENT {lab['name'] or '(no name)'}  id={lab['patient_id'] or '(none)'}"
            tail = f"{n.studies} studies, {n.series} series, {n.instances} instances, {_size(n.size)}"
        elif n.level == "study":
            head = f"STUDY {lab['date'] or '--------'} {lab['description'] or '(no description)'}  {n.uid}"
            tail = f"{n.series} series, {n.instances} instances, {_size(n.size)}"
        elif n.level == "series":
            num = "" if lab["number"] is None else f"#{lab['number']} "
            head = f"SERIES {lab['modality'] or '??'} {num}{lab['description'] or ''}  {n.uid}"
            tail = f"{n.instances} instances, {_size(n.size)}"
        else:
            head = f"{n.uid}"
            tail = f"{_size(n.size)}  sha256={lab['sha256']}"
        out.write(f"{pad}{head}  [{tail}]\n")
        _print(n.children, indent + 1)


def run(ctx: Context, args: argparse.Namespace) -> int:
    db = ctx.open_database()
    nodes = _prune(db.tree(selection_from(args, db, required=False), args.level), args.level)
    if args.json:
        sys.stdout.write(msgspec.json.encode(nodes).decode() + "\n")
    elif not nodes:
        print("(nothing selected)" if not getattr(args, "whole", False) else "(the database is empty)")
    else:
        _print(nodes)
    return 0


@hookimpl
def dicomvault_register_operations() -> list[Operation]:
    return [Operation(name="ls", help="list patients, studies, series (and instances) with counts and sizes",
                      configure=configure, run=run)]
