"""Ingest: ``dicomvault import-dicom`` into a fresh embedded database.

Target (issue 2): at least 1,000 files/s on 2 cores. ``extra_info`` holds
files/s and MB/s of the median round.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from benchutil import ROUNDS, DataSet, fresh_dirs, run_cli, throughput
from dicomvault.dicom.probe import read_header


def _bench_ingest(benchmark: Any, data: DataSet, scratch: Path) -> None:
    new_db = fresh_dirs(scratch, "db")

    def setup() -> tuple[tuple[Path], dict[str, Any]]:
        return (new_db(),), {}

    def ingest(db: Path) -> None:
        run_cli("--db", db, "-q", "import-dicom", data.dicom)

    benchmark.pedantic(ingest, setup=setup, rounds=ROUNDS, iterations=1)
    throughput(benchmark, data)


def test_ingest_mixed(benchmark: Any, synth_data: DataSet, scratch: Path) -> None:
    """Mixed PET/CT/MR (mostly 512x512 CT): bytes dominate."""
    benchmark.group = "ingest"
    _bench_ingest(benchmark, synth_data, scratch)


def test_ingest_small_files(benchmark: Any, small_files: DataSet, scratch: Path) -> None:
    """Mostly 128x128 PET slices (~35 KB): per-file overhead dominates."""
    benchmark.group = "ingest"
    _bench_ingest(benchmark, small_files, scratch)


def test_probe_headers_one_core(benchmark: Any, small_files: DataSet) -> None:
    """Header parsing alone, one process (``dicomvault.dicom.probe.read_header``,
    what each ingest worker runs per file): the parse ceiling per core."""
    benchmark.group = "ingest-parts"
    files = sorted(str(p) for p in small_files.dicom.rglob("*") if p.is_file())

    def probe_all() -> None:
        for f in files:
            read_header(f)

    benchmark.pedantic(probe_all, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    throughput(benchmark, small_files)
