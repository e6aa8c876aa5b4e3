"""Shared fixtures: real DICOM from the installed packages, fresh databases,
and the CLI run in-process."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicomvault.cli.main import main
from dicomvault.plugins.ops.demo import real_dicom_folders


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test touches the user's default database or third-party plugins,
    nor draws a progress display because the caller's environment asks for
    terminal output (FORCE_COLOR, TTY_COMPATIBLE: a test sets them itself)."""
    monkeypatch.setenv("DICOMVAULT_DB", str(tmp_path / "default-db"))
    monkeypatch.setenv("DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD", "1")
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """Run ``dicomvault ARGS...`` in-process; returns code, stdout, stderr."""

    def run(*args: str | os.PathLike[str]) -> CliResult:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def real_dicom() -> list[str]:
    """Folders of real DICOM shipped in pydicom and pydicom-data."""
    folders = real_dicom_folders()
    assert len(folders) == 3, f"pydicom and pydicom-data must be installed, found {folders}"
    return folders


@pytest.fixture(scope="session")
def pydicom_files() -> Path:
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files"


# ---------------------------------------------------------------- real peers (tests/peers.py)
@pytest.fixture(scope="session")
def postgres_server():  # type: ignore[no-untyped-def]
    """One throw-away PostgreSQL cluster for the session; tests make their own databases in it."""
    from peers import postgres

    with postgres() as pg:
        yield pg


@pytest.fixture
def orthanc_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A fresh Orthanc with empty storage, for one test."""
    from peers import orthanc

    with orthanc(tmp_path / "orthanc") as server:
        yield server


@pytest.fixture
def storescp_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A fresh DCMTK storescp writing into its own folder, for one test."""
    from peers import storescp

    with storescp(tmp_path / "storescp") as server:
        yield server
