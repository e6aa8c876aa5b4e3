"""export-dicom: ``dicomvault export-dicom OUT --whole`` from an embedded
database, as DICOM media with a DICOMDIR and with the readable default layout.

Target (issue 4): ``--dicomdir`` at most 1.0x the time of ``cp -r`` of the same
files plus DCMTK ``dcmmkdir +r`` (benchmarks/export_side_by_side.py runs the
real peer); here ``extra_info`` records files/s and MB/s, on the small-file
data set where per-file work dominates.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchutil import ROUNDS, Database, DataSet, fresh_dirs, run_cli, throughput


@pytest.fixture(scope="session")
def ingested_small(small_files: DataSet, tmp_path_factory: pytest.TempPathFactory) -> Database:
    """An embedded database holding ``small_files`` (ingested once)."""
    db = tmp_path_factory.mktemp("db-small") / "db"
    run_cli("--db", db, "-q", "import-dicom", small_files.dicom)
    return Database(db, small_files)


def _bench_export(benchmark: Any, db: Database, scratch: Path, *options: str) -> None:
    new_out = fresh_dirs(scratch, "out")

    def setup() -> tuple[tuple[Path], dict[str, Any]]:
        return (new_out(),), {}

    def export(out: Path) -> None:
        run_cli("--db", db.path, "-q", "export-dicom", out, "--whole", *options)

    benchmark.pedantic(export, setup=setup, rounds=ROUNDS, iterations=1)
    throughput(benchmark, db.data)


def test_export_dicom_dicomdir(benchmark: Any, ingested_small: Database, scratch: Path) -> None:
    """DICOM media: File IDs, DICOMDIR, report (the small files are Explicit VR LE: no conversion)."""
    benchmark.group = "export-dicom"
    _bench_export(benchmark, ingested_small, scratch, "--dicomdir")


def test_export_dicom_readable(benchmark: Any, ingested_small: Database, scratch: Path) -> None:
    """The default readable layout (patient/study/series folders named from the records)."""
    benchmark.group = "export-dicom"
    _bench_export(benchmark, ingested_small, scratch)
