"""``demo``: the main job end to end on real DICOM.

Ingests the real files shipped in the pydicom (and, when installed,
pydicom-data) packages into a new embedded database, attaches a file and
sets attributes, exports the whole database to a .bkp, imports the .bkp into
a second, fresh database and verifies every instance by SHA-256, every
attribute and every attachment.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import time
from pathlib import Path

from dicomvault.engine import Context, Item, Operation, Report, Selection, UsageError, hookimpl, transfer
from dicomvault.engine.types import Outcome

from .compare import compare

MARKER = ".dicomvault-demo"


def real_dicom_folders() -> list[str]:
    """Folders of real DICOM shipped inside installed packages."""
    folders = []
    spec = importlib.util.find_spec("pydicom")
    if spec and spec.origin:
        data = Path(spec.origin).parent / "data"
        folders += [str(data / "test_files"), str(data / "charset_files")]
    spec = importlib.util.find_spec("data_store")  # the pydicom-data package
    if spec and spec.origin:
        folders.append(str(Path(spec.origin).parent / "data"))
    return [f for f in folders if os.path.isdir(f)]


def _prepare(workdir: Path) -> None:
    if workdir.exists():
        if not (workdir / MARKER).exists() and any(workdir.iterdir()):
            raise UsageError(f"{workdir} exists and is not a demo folder; choose another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(mode=0o700, parents=True)
    (workdir / MARKER).write_text("made by 'dicomvault demo'; safe to delete\n")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="dicomvault-demo",
                   help="folder for the demo databases and backup (default: ./dicomvault-demo; replaced "
                        "on each run)")


def _phase(ctx: Context, report: Report, name: str, phase: Report) -> None:
    if ctx.json_output:  # a person has seen this line already
        report.details[name] = {"seconds": phase.seconds, **{w: c for w, c in phase.counts.items()}}
    elif not ctx.quiet:
        # a comparison's "unchanged" is what a person calls identical
        word = {"unchanged": "identical"} if name == "verify" else {}
        counts = "; ".join(f"{w}: " + ", ".join(f"{n} {word.get(o, o)}" for o, n in sorted(c.items()))
                           for w, c in phase.counts.items())
        print(f"{name:<12} {phase.seconds:6.1f} s  {counts}")


def run(ctx: Context, args: argparse.Namespace) -> Report:
    folders = real_dicom_folders()
    if not folders:
        raise UsageError("no real DICOM found: install pydicom (and pydicom-data) first")
    workdir = Path(args.workdir).resolve()
    _prepare(workdir)
    report = Report(operation="demo")
    started = time.monotonic()
    ctx.item_lines = False  # the broken test files are expected: summarised below, not listed
    db = ctx.open_database(str(workdir / "db"), create=True)
    ingest = transfer(ctx, ctx.open_source("files:" + ",".join(folders)), db.target(), Selection(whole=True),
                      operation="import-dicom")
    _phase(ctx, report, "import-dicom", ingest)
    stored = ingest.count(Outcome.STORED, "instance")
    if not stored:
        report.aborted = "nothing was ingested"
        return report
    # Database attributes and an attachment, to show that they travel too.
    first = next(it for it in db.source().instances(Selection(whole=True)) if isinstance(it, Item))
    voi = workdir / "liver-voi.csv"
    voi.write_text("roi,label,volume_ml\n1,liver,1520.5\n")
    db.add_attachment("study", first.study.study_uid, str(voi), voi.name, "text/csv")
    db.update_attributes("study", first.study.study_uid, comment="demo study", add_tags=("demo", "qc-ok"),
                         fields={"project": "dicomvault-demo"})
    db.update_attributes("patient", first.patient.key, fields={"cohort": "A"})
    backup = workdir / "whole-database.bkp"
    src = db.source()
    export = transfer(ctx, src, ctx.open_target(f"bkp:{backup}"), Selection(whole=True),
                      operation="export-db")
    src.close()
    _phase(ctx, report, "export-db", export)
    restored = ctx.open_database(str(workdir / "restored"), create=True)
    bkp = ctx.open_source(f"bkp:{backup}")
    restore = transfer(ctx, bkp, restored.target(), Selection(whole=True), operation="import-db")
    bkp.close()
    _phase(ctx, report, "import-db", restore)
    mine, theirs = db.source(), restored.source()
    check = compare(mine, theirs, Selection(whole=True))
    mine.close()
    theirs.close()
    _phase(ctx, report, "verify", check)
    for problem in (*export.problems, *restore.problems, *check.problems):
        report.problems.append(problem)
    size = sum(it.instance.size for it in db.source().instances(Selection(whole=True))
               if isinstance(it, Item))
    reasons: dict[str, int] = {}
    for p in ingest.problems:
        reason = ("same SOP Instance UID, other bytes" if p.outcome == Outcome.CONFLICT.value
                  else p.reason.split(" (")[0].split(":")[0])
        reasons[reason] = reasons.get(reason, 0) + 1
    report.details.update({
        "files not stored (expected: pydicom ships broken files, and one image under one UID in "
        "several encodings)":
            dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "the same file met twice (stored once)": ingest.count(Outcome.UNCHANGED, "instance"),
        "DICOMDIR files (media directories, not instances)": ingest.count(Outcome.IGNORED, "file"),
        "instances in the database": stored,
        "instances verified identical by SHA-256": check.count(Outcome.UNCHANGED, "instance"),
        "database bytes": size,
        "backup file": str(backup),
        "backup bytes": backup.stat().st_size,
        "compression ratio": round(size / backup.stat().st_size, 2),
        "database": str(workdir / "db"),
        "restored database": str(workdir / "restored"),
        "look around": f"dicomvault --db {shlex.quote(str(workdir / 'restored'))} ls --whole; "
                       f"dicomvault bkp ls {shlex.quote(str(backup))}",
    })
    report.seconds = round(time.monotonic() - started, 3)
    if check.count(Outcome.UNCHANGED, "instance") != stored:
        report.aborted = "verification failed"
    return report


@hookimpl
def dicomvault_register_operations() -> list[Operation]:
    return [Operation(name="demo", help="ingest real DICOM from the pydicom packages, back it up to a .bkp, "
                      "restore it into a fresh database and verify everything", configure=configure, run=run)]
