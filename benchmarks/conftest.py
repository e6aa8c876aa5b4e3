"""Fixtures for the pytest-benchmark cases.

Run with::

    .venv/bin/python -m pytest benchmarks/ --benchmark-only

Synthetic studies (real CT/MR headers cloned, pixel bytes written directly,
deterministic by seed) are generated once per session under pytest's
temporary directory (``/tmp/pytest-of-$USER/...``), never inside the
repository. Environment knobs:

``DICOMVAULT_BENCH_SIZE``    size of the main data set (default ``200MB``)
``DICOMVAULT_BENCH_SMALL``   size of the small-file data set (default ``60MB``)
``DICOMVAULT_BENCH_ROUNDS``  timed rounds per case (default ``3``)
``DICOMVAULT_BENCH_SEED``    generator seed (default ``1``)
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchutil import RESULTS, Backup, Database, DataSet, generate, run_cli


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the user's default database or third-party plugins."""
    monkeypatch.setenv("DICOMVAULT_DB", str(tmp_path / "default-db"))
    monkeypatch.setenv("DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD", "1")


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> DataSet:
    """Mixed PET/CT/MR studies (mostly 512x512 CT slices, ~300 KB a file)."""
    size = os.environ.get("DICOMVAULT_BENCH_SIZE", "200MB")
    return generate(tmp_path_factory.mktemp("synth-mixed"), "--size", size)


@pytest.fixture(scope="session")
def small_files(tmp_path_factory: pytest.TempPathFactory) -> DataSet:
    """PET/CT studies with 128x128 PET slices: ~90 % of the files are ~35 KB,
    so per-file overhead dominates (the files/s target)."""
    size = os.environ.get("DICOMVAULT_BENCH_SMALL", "60MB")
    return generate(tmp_path_factory.mktemp("synth-small"), "--size", size, "--mix", "petct",
                    "--pet-matrix", "128", "--ct-slices", "1", "--pet-slices", "150-250")


@pytest.fixture(scope="session")
def ingested(synth_data: DataSet, tmp_path_factory: pytest.TempPathFactory) -> Database:
    """An embedded database holding ``synth_data`` (ingested once)."""
    db = tmp_path_factory.mktemp("db-src") / "db"
    run_cli("--db", db, "-q", "import-dicom", synth_data.dicom)
    return Database(db, synth_data)


@pytest.fixture(scope="session")
def backup(ingested: Database, tmp_path_factory: pytest.TempPathFactory) -> Backup:
    """A .bkp of the whole ``ingested`` database (written once)."""
    out = tmp_path_factory.mktemp("bkp") / "whole.bkp"
    run_cli("--db", ingested.path, "-q", "export-db", out, "--whole")
    return Backup(out, ingested.data)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Throughput of each case (median round), after pytest-benchmark's tables."""
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("dicomvault throughput (median round; 1 MB = 10^6 bytes)")
    for name, info in RESULTS:
        extra = f"  ratio {info['compression_ratio']}" if "compression_ratio" in info else ""
        tr.write_line(f"{name:34s} {info['files']:6d} files {info['bytes'] / 1e6:8.1f} MB  "
                      f"{info['files_per_s']:8.1f} files/s {info['mb_per_s']:7.1f} MB/s{extra}")
