"""``replicate`` and ``move``: copy a selection, with its attributes and
attachments, from one database to another; ``move`` then deletes from the
source what the target has confirmed.

Replication is incremental: an instance the target already holds with the
same SHA-256 is "unchanged" and not copied again; one it holds with other
bytes is a conflict, handled by ``--on-conflict``. Every copy is verified
at the target (see the Target contract) before it counts. A run that was
interrupted is simply run again.

``move`` deletes only after the target's ``finish(True)`` has made every
copy durable, and only instances whose outcome was stored, unchanged or
overwritten; each deletion re-checks the source's SHA-256
(``Source.delete``). Whatever is left behind is listed, and the run then
ends "partly done".
"""
from __future__ import annotations

import argparse
from pathlib import Path
from urllib.parse import urlsplit

from dicomvault.engine import (
    Context,
    DicomvaultError,
    Item,
    Operation,
    Outcome,
    Report,
    Selection,
    Source,
    UsageError,
    hookimpl,
    transfer,
)
from dicomvault.engine.options import add_policy_option, add_selection_options, policy_from, selection_from
from dicomvault.engine.passphrase import add_passphrase_options
from dicomvault.engine.types import Problem

CONFIRMED = (Outcome.STORED, Outcome.UNCHANGED, Outcome.OVERWRITTEN)


def _configure(p: argparse.ArgumentParser, *, dry_run: bool) -> None:
    p.add_argument("--to", dest="target", metavar="DBURL", required=True,
                   help="the database to copy to: a path, postgresql://..., orthanc+http://...")
    p.add_argument("--from", dest="source", metavar="DBURL",
                   help="the database to copy from (default: the database, --db)")
    add_selection_options(p)
    add_policy_option(p)
    add_passphrase_options(p)
    if dry_run:
        p.add_argument("--dry-run", action="store_true", help="report what would happen; change nothing")


def _open(ctx: Context, args: argparse.Namespace) -> tuple[Source, Selection]:
    db = ctx.open_database(args.source) if args.source is None or args.selected else None
    selection = selection_from(args, db)
    return (db.source() if db is not None else ctx.open_source(args.source)), selection


def _replicate_run(ctx: Context, args: argparse.Namespace) -> Report:
    source, selection = _open(ctx, args)
    try:
        target = ctx.open_target(args.target)
        report = transfer(ctx, source, target, selection, policy=policy_from(args), dry_run=args.dry_run,
                          operation="replicate (dry run)" if args.dry_run else "replicate")
    finally:
        source.close()
    report.details.update({"from": source.description, "to": target.description})
    return report


def _place(url: str) -> str:
    """An address reduced to what names the place: a resolved path, or the URL without password and query."""
    if "://" not in url:
        return str(Path(url.removeprefix("sqlite:")).expanduser().resolve())
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port}{parts.path}"


def _move_run(ctx: Context, args: argparse.Namespace) -> Report:
    if _place(args.source or ctx.db_url) == _place(args.target):
        raise UsageError("the source and the target of move are the same database")
    source, selection = _open(ctx, args)
    try:
        if getattr(source, "delete", None) is None:
            raise UsageError(f"{source.description} cannot delete instances, so nothing can be moved "
                             "out of it; use replicate")
        target = ctx.open_target(args.target)
        confirmed: list[Item] = []
        left: list[str] = []

        unverifiable: list[tuple[str, Outcome]] = []  # kept by the target, but not as our bytes

        def seen(item: Item, outcome: Outcome) -> None:
            if outcome in CONFIRMED:
                confirmed.append(item)
                return
            left.append(item.instance.sop_uid)
            if not outcome.is_problem:
                unverifiable.append((item.instance.sop_uid, outcome))

        # transfer() returns only after target.finish(True): every confirmed copy is durable now.
        report = transfer(ctx, source, target, selection, policy=policy_from(args), operation="move",
                          on_instance=seen)
        for uid, outcome in unverifiable:  # named, and the job is "partly done" (exit code 1)
            report.problems.append(Problem(uid, "source", "left", (
                f"the target answered '{outcome.value}': its copy is not byte for byte ours, so the "
                "original stays in the source")))
        moved = _delete_confirmed(source, confirmed, report, left)
    finally:
        source.close()
    report.details.update({"from": source.description, "to": target.description, "moved": moved,
                           "left in source": sorted(left)})
    return report


def _delete_confirmed(source: Source, confirmed: list[Item], report: Report, left: list[str]) -> int:
    delete = source.delete  # type: ignore[attr-defined]
    moved = 0
    for item in confirmed:
        uid = item.instance.sop_uid
        # A source that had no digest for an instance may tell the SHA-256 of what it served.
        sha = item.instance.sha256 or getattr(source, "served", {}).get(uid, "")
        reason = ""
        try:
            if not sha:
                reason = "the source gave no SHA-256 for it, so its deletion cannot be checked"
            elif not delete(uid, sha):
                reason = "its content in the source changed (or it is gone) since it was copied"
        except (DicomvaultError, OSError) as exc:
            reason = f"could not delete it: {exc}"
        if reason:
            report.add("source", Outcome.FAILED, uid,
                       f"copied and verified, but left in the source: {reason}")
            left.append(uid)
        else:
            moved += 1
    return moved


@hookimpl
def dicomvault_register_operations() -> list[Operation]:
    return [
        Operation(name="replicate", help="copy a selection with its attributes and attachments to another "
                  "database (incremental, verified by SHA-256)",
                  configure=lambda p: _configure(p, dry_run=True), run=_replicate_run),
        Operation(name="move", help="replicate, then delete from the source what the target confirmed",
                  configure=lambda p: _configure(p, dry_run=False), run=_move_run),
    ]
