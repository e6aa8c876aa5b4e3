"""Moving selections between sources and targets: ``export-db`` (database to
.bkp), ``import-db`` (.bkp to database) and the general ``transfer``."""
from __future__ import annotations

import argparse
from pathlib import Path

from dicomvault import __version__
from dicomvault.engine import (
    Context,
    Item,
    Operation,
    Report,
    Selection,
    Source,
    UsageError,
    hookimpl,
    transfer,
)
from dicomvault.engine.options import add_policy_option, add_selection_options, policy_from, selection_from
from dicomvault.engine.passphrase import add_passphrase_options
from dicomvault.formats.bkp.volumes import (
    VolumeSizeError,
    attachment_cost,
    fits_alone,
    instance_cost,
    parse_size,
    records_cost,
)


def _volume_size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _export_configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUT.bkp", help="the backup file to write")
    add_selection_options(p)
    p.add_argument("--force", action="store_true", help="replace OUT.bkp (or its volumes) if it exists")
    add_passphrase_options(p, encrypt=True)
    p.add_argument("--volume-size", type=_volume_size, default=None, metavar="SIZE",
                   help="split the backup into volumes OUT.001.bkp, OUT.002.bkp, ... of at most SIZE "
                        "bytes each: 2G, 650M, 4700M, 1.5G (K, M, G, T are powers of 1000), 2GiB "
                        "(powers of 1024), a number of bytes, or fat32 (4 GiB - 1 byte)")


def _check_fits(source: Source, selection: Selection, limit: int) -> None:
    """Before anything is written: every instance and attachment fits in a volume on its own."""
    writer = f"dicomvault {__version__}"
    for it in source.instances(selection):
        if isinstance(it, Item):
            cost = instance_cost(it.instance) + records_cost((it.patient, it.study, it.series))
            if not fits_alone(limit, it.instance.size, cost, writer):
                raise VolumeSizeError(f"instance {it.instance.sop_uid} ({it.instance.size} bytes) does not "
                                      f"fit in a volume of {limit} bytes; choose a larger --volume-size "
                                      "(instances are not split across volumes); nothing was written")
    for rec, _open in source.attachments(selection):
        if not fits_alone(limit, rec.size, attachment_cost(rec) + 1024, writer):
            raise VolumeSizeError(f"attachment {rec.attachment_id} ({rec.size} bytes) does not fit in a "
                                  f"volume of {limit} bytes; choose a larger --volume-size; nothing was "
                                  "written")


def _export_run(ctx: Context, args: argparse.Namespace) -> Report:
    if not args.output.lower().endswith(".bkp"):
        raise UsageError("the output file name must end in .bkp")
    if ctx.passphrase.given and not args.encrypt:
        raise UsageError("--passphrase-env and --passphrase-file go with --encrypt: add --encrypt to "
                         "write an encrypted file")
    db = ctx.open_database()
    selection = selection_from(args, db)
    source = db.source()
    try:
        if args.volume_size:
            _check_fits(source, selection, args.volume_size)
            ctx.volume_size = args.volume_size
        target = ctx.open_target("bkp:" + args.output)
        preload = getattr(target, "preload_attributes", None)
        if preload is not None:  # a volume set puts attributes into the volumes of their entities
            try:
                preload(source.attributes(selection))
            except BaseException:
                target.finish(False)
                raise
        report = transfer(ctx, source, target, selection, operation="export-db")
    finally:
        source.close()
    report.details["file"] = args.output
    files = getattr(target, "files", None)
    if args.volume_size and files:
        report.details["volumes"] = [str(f) for f in files]
    written = [Path(f) for f in files] if args.volume_size and files else [Path(args.output)]
    if all(f.is_file() for f in written):  # not after a failed run: nothing is under the name
        report.details["file size"] = sum(f.stat().st_size for f in written)
    return report


def _import_configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN.bkp", help="the backup file to restore from (for a volume set: "
                   "any of its volumes IN.NNN.bkp, or IN.bkp)")
    add_selection_options(p, selected=False)
    add_policy_option(p)
    p.add_argument("--dry-run", action="store_true", help="report what would happen; change nothing")
    add_passphrase_options(p)


def _import_run(ctx: Context, args: argparse.Namespace) -> Report:
    selection = selection_from(args, required=False)
    source = ctx.open_source("bkp:" + args.input)
    try:
        # As a target, not a database: a database that does not exist yet is
        # created by the first write, so a dry run leaves nothing behind.
        target = ctx.open_target(ctx.db_url)
        name = "import-db (dry run)" if args.dry_run else "import-db"
        report = transfer(ctx, source, target, selection, policy=policy_from(args),
                          dry_run=args.dry_run, operation=name)
    finally:
        source.close()
    report.details["database"] = ctx.db_url
    return report


def _transfer_configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", metavar="URL",
                   help="where to read from (default: the database, --db)")
    p.add_argument("--to", dest="target", metavar="URL", required=True, help="where to write to")
    add_selection_options(p)
    add_policy_option(p)
    p.add_argument("--dry-run", action="store_true", help="report what would happen; change nothing")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    add_passphrase_options(p, encrypt=True)


def _transfer_run(ctx: Context, args: argparse.Namespace) -> Report:
    if args.encrypt and ctx.hooks.find(ctx.hooks.targets(), args.target, "target").name != "bkp":
        raise UsageError("--encrypt applies to a .bkp target only")
    db = ctx.open_database() if args.source is None or args.selected else None
    selection = selection_from(args, db)
    source = db.source() if args.source is None and db is not None else ctx.open_source(args.source)
    try:
        target = ctx.open_target(args.target)
        report = transfer(ctx, source, target, selection, policy=policy_from(args), dry_run=args.dry_run,
                          operation="transfer")
    finally:
        source.close()
    report.details["from"] = source.description
    report.details["to"] = target.description
    return report


@hookimpl
def dicomvault_register_operations() -> list[Operation]:
    return [
        Operation(name="export-db", help="write a selection of the database, with its attributes and "
                  "attachments, into one .bkp file", configure=_export_configure, run=_export_run),
        Operation(name="import-db", help="restore all or part of a .bkp file into the database",
                  configure=_import_configure, run=_import_run),
        Operation(name="transfer", help="copy a selection from any source to any target "
                  "(see 'dicomvault plugins' for the kinds)", configure=_transfer_configure,
                  run=_transfer_run),
    ]
