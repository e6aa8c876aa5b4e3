"""``import-dicom``: walk folders and store every DICOM instance found."""
from __future__ import annotations

import argparse

from dicomvault.engine import Context, Operation, Report, Selection, hookimpl, transfer
from dicomvault.engine.options import add_policy_option, policy_from
from dicomvault.plugins.folder_source import FolderSource


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (searched recursively)")
    add_policy_option(p)
    p.add_argument("--jobs", type=int, default=None, help="header-parsing processes (default: CPUs)")


def run(ctx: Context, args: argparse.Namespace) -> Report:
    db = ctx.open_database(create=True)
    source = FolderSource(args.paths, jobs=args.jobs)
    report = transfer(ctx, source, db.target(), Selection(whole=True), policy=policy_from(args),
                      operation="import-dicom")
    report.details["database"] = db.url
    return report


@hookimpl
def dicomvault_register_operations() -> list[Operation]:
    return [Operation(name="import-dicom", help="store the DICOM files found under PATHs in the database",
                      configure=configure, run=run)]
