"""``gc``: remove what interrupted writers (a kill -9, a power cut) left in
the database's file store. Nothing that a catalog row names is ever touched."""
from __future__ import annotations

import argparse
import sys

import msgspec

from dicomvault.engine import Context, Operation, UsageError, hookimpl


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _run(ctx: Context, args: argparse.Namespace) -> int:
    db = ctx.open_database()
    collect = getattr(db, "collect_garbage", None)
    if collect is None:
        raise UsageError(f"{db.url} keeps no file store of its own: nothing to collect")
    done = collect(dry_run=args.dry_run)
    if args.json:
        sys.stdout.write(msgspec.json.encode(done).decode() + "\n")
    elif not ctx.quiet:
        verb = "would remove" if args.dry_run else "removed"
        print(f"gc: {verb} {done.store_files} store file(s) no catalog row names "
              f"({_mb(done.store_bytes)}) and {done.staged_files} staged file(s) of writers that are "
              f"gone ({_mb(done.staged_bytes)})")
    return 0


@hookimpl
def dicomvault_register_operations() -> list[Operation]:
    return [Operation(name="gc", help="remove what interrupted writers left in the database's file store "
                      "(never anything the catalog names)", configure=_configure, run=_run)]
