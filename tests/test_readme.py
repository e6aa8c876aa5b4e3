"""The README's two commands stay true: CI runs the test command verbatim,
and the demo command's job works end to end."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```sh\n(.+?)\n```", text)


def test_readme_starts_with_the_two_commands() -> None:
    setup_and_demo, tests = readme_commands()[:2]
    assert setup_and_demo.endswith("dicomvault demo")
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_demo_round_trips_real_dicom(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = cli("--json", "demo", "--workdir", tmp_path / "demo")
    assert result.code == 0, result.err
    report = result.json()
    stored = report["details"]["instances in the database"]
    assert stored > 100  # pydicom + pydicom-data hold well over a hundred valid instances
    assert report["details"]["instances verified identical by SHA-256"] == stored
    assert report["details"]["verify"]["attachment"] == {"unchanged": 1}
    assert report["details"]["verify"]["attributes"] == {"unchanged": 2}
    assert (tmp_path / "demo" / "whole-database.bkp").stat().st_mode & 0o077 == 0
    # it says where things are, and what the files it did not store were
    assert report["details"]["restored database"] == str((tmp_path / "demo" / "restored").resolve())
    assert report["details"]["DICOMDIR files (media directories, not instances)"] == \
        report["details"]["import-dicom"]["file"].get("ignored", 0)


def test_demo_refuses_a_folder_it_did_not_make(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "precious.txt").write_text("keep me")
    result = cli("demo", "--workdir", tmp_path)
    assert result.code == 64
    assert (tmp_path / "precious.txt").read_text() == "keep me"
