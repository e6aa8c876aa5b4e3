"""The .bkp format: write (``export-db --whole``) and read (``import-db`` into a
fresh database), plus the format alone (BkpWriter / BkpReader without a
database) to separate format cost from catalog and store cost.

Target (issue 2): export-db at least 0.7x the throughput of
``tar c | zstd -3 -T0`` at a compression ratio no worse (the side-by-side
script compares against the real peer; here ``extra_info`` records MB/s and
the compression ratio).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from benchutil import ROUNDS, Backup, Database, DataSet, fresh_dirs, run_cli, throughput
from dicomvault.formats.bkp.manifest import Manifest
from dicomvault.formats.bkp.reader import BkpReader
from dicomvault.formats.bkp.writer import BkpWriter


def test_export_db(benchmark: Any, ingested: Database, scratch: Path) -> None:
    """``dicomvault export-db OUT.bkp --whole`` (the .bkp write path)."""
    benchmark.group = "bkp-write"
    new_out = fresh_dirs(scratch, "out")
    sizes: list[int] = []

    def setup() -> tuple[tuple[Path], dict[str, Any]]:
        return (new_out().with_suffix(".bkp"),), {}

    def export(out: Path) -> None:
        run_cli("--db", ingested.path, "-q", "export-db", out, "--whole")
        sizes.append(out.stat().st_size)

    benchmark.pedantic(export, setup=setup, rounds=ROUNDS, iterations=1)
    throughput(benchmark, ingested.data)
    benchmark.extra_info["bkp_bytes"] = sizes[-1]
    benchmark.extra_info["compression_ratio"] = round(ingested.data.bytes / sizes[-1], 3)


def test_import_db(benchmark: Any, backup: Backup, scratch: Path) -> None:
    """``dicomvault import-db IN.bkp`` into a fresh database (the .bkp read path)."""
    benchmark.group = "bkp-read"
    new_db = fresh_dirs(scratch, "db")

    def setup() -> tuple[tuple[Path], dict[str, Any]]:
        return (new_db(),), {}

    def restore(db: Path) -> None:
        run_cli("--db", db, "-q", "import-db", backup.path)

    benchmark.pedantic(restore, setup=setup, rounds=ROUNDS, iterations=1)
    throughput(benchmark, backup.data)


def _files(data: DataSet) -> list[Path]:
    return sorted(p for p in data.dicom.rglob("*") if p.is_file())


def test_bkp_writer_format_only(benchmark: Any, synth_data: DataSet, scratch: Path) -> None:
    """BkpWriter alone: every file appended as a blob, zstd -3 frames, empty
    record lists, fsync + rename. No catalog, no SHA-256."""
    benchmark.group = "bkp-write"
    files = _files(synth_data)
    new_out = fresh_dirs(scratch, "raw")

    def setup() -> tuple[tuple[Path], dict[str, Any]]:
        return (new_out().with_suffix(".bkp"),), {}

    def write(out: Path) -> None:
        w = BkpWriter(out, writer="benchmark")
        for f in files:
            with open(f, "rb") as fh:
                w.add_blob(fh)
        w.finish(Manifest(major=0, minor=0, writer="", created=""))

    benchmark.pedantic(write, setup=setup, rounds=ROUNDS, iterations=1)
    throughput(benchmark, synth_data)


def test_bkp_reader_format_only(benchmark: Any, backup: Backup) -> None:
    """BkpReader alone: open, then read every instance blob in payload order
    (checksums verified, frames decompressed), bytes discarded."""
    benchmark.group = "bkp-read"

    def read() -> int:
        r = BkpReader(backup.path)
        total = 0
        try:
            for entry in sorted(r.iter_instances(), key=lambda e: e.blob.offset):
                with r.open_blob(entry.blob) as fh:
                    while chunk := fh.read(1 << 20):
                        total += len(chunk)
        finally:
            r.close()
        return total

    total = benchmark.pedantic(read, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert total == backup.data.bytes
    throughput(benchmark, backup.data)
    benchmark.extra_info["bkp_bytes"] = os.path.getsize(backup.path)
