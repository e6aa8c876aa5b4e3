"""Helpers shared by the benchmark cases (fixtures are in conftest.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomvault.cli.main import main as dicomvault_main

HERE = Path(__file__).resolve().parent
SYNTH = HERE / "synth.py"
ROUNDS = int(os.environ.get("DICOMVAULT_BENCH_ROUNDS", "3"))
SEED = int(os.environ.get("DICOMVAULT_BENCH_SEED", "1"))
RESULTS: list[tuple[str, dict[str, Any]]] = []  # (case, extra_info), printed at the end of the session


@dataclass(frozen=True)
class DataSet:
    """A generated folder of DICOM files and what it holds."""

    dicom: Path  # the folder to ingest (OUT/DICOM)
    files: int
    bytes: int


@dataclass(frozen=True)
class Database:
    path: Path
    data: DataSet


@dataclass(frozen=True)
class Backup:
    path: Path
    data: DataSet


def generate(out: Path, *args: str) -> DataSet:
    """Run benchmarks/synth.py (a subprocess: it forks its own pool)."""
    subprocess.run([sys.executable, str(SYNTH), str(out), "--seed", str(SEED), *args],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    files = [p for p in (out / "DICOM").rglob("*") if p.is_file()]
    return DataSet(out / "DICOM", len(files), sum(p.stat().st_size for p in files))


def run_cli(*args: str | os.PathLike[str]) -> None:
    """``dicomvault ARGS...`` in-process, through the public CLI entry point."""
    code = dicomvault_main([str(a) for a in args])
    assert code == 0, f"dicomvault {' '.join(map(str, args))} exited with {code}"


def fresh_dirs(base: Path, prefix: str) -> Callable[[], Path]:
    """A factory of new paths under ``base``; each call removes the previous
    one so that a many-round benchmark does not fill the disk."""
    state: dict[str, Any] = {"n": 0, "last": None}

    def make() -> Path:
        if state["last"] is not None:
            last: Path = state["last"]
            if last.is_dir():
                shutil.rmtree(last)
            else:
                last.unlink(missing_ok=True)
        state["n"] += 1
        state["last"] = base / f"{prefix}{state['n']}"
        return state["last"]  # type: ignore[no-any-return]

    return make


def throughput(benchmark: Any, data: DataSet) -> None:
    """Put files/s and MB/s (1 MB = 10^6 bytes) into ``extra_info``, from
    the median and the best round. With ``--benchmark-disable`` (each case run
    once, as a test) there is nothing to report."""
    if benchmark.stats is None:
        return
    stats = benchmark.stats.stats
    benchmark.extra_info.update(
        files=data.files, bytes=data.bytes,
        files_per_s=round(data.files / stats.median, 1),
        mb_per_s=round(data.bytes / 1e6 / stats.median, 1),
        best_files_per_s=round(data.files / stats.min, 1),
        best_mb_per_s=round(data.bytes / 1e6 / stats.min, 1),
    )
    RESULTS.append((benchmark.name, benchmark.extra_info))
