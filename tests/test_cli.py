"""The command line as a user meets it: exit codes, error messages, JSON
output, help, privacy of log lines and of the files the database creates."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from dicomvault.plugins.embedded.database import EmbeddedDatabase
from dicomvault.plugins.ops.demo import real_dicom_folders

OUT = "out.bkp"


def run_dv(*args: str | os.PathLike[str], cwd: Path, umask: int | None = None,
           console_script: bool = False) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DICOMVAULT_DB=str(cwd / "default-db"), DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD="1")
    exe = ([str(Path(sys.executable).parent / "dicomvault")] if console_script
           else [sys.executable, "-m", "dicomvault"])
    return subprocess.run([*exe, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300, preexec_fn=None if umask is None else (lambda: os.umask(umask)))


def assert_clean_error(err: str) -> None:
    assert "Traceback" not in err
    assert "dicomvault: error: " in err, err


# ----------------------------------------------------------------- start-up cost
# Loaded only by the commands that need them: each costs tens of milliseconds at a cold start,
# which a restore or a script calling dicomvault many times would otherwise pay every run.
HEAVY_AT_START = ("rich", "cryptography", "multiprocessing", "urllib.request", "ssl", "pydicom")


def test_a_plain_command_loads_no_heavy_module(tmp_path: Path) -> None:
    golden = Path(__file__).parent / "golden" / "bkp" / "v1" / "basic.bkp"
    env = dict(os.environ, DICOMVAULT_DB=str(tmp_path / "db"), DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD="1")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "dicomvault", "bkp", "inspect",
                           str(golden)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
              if line.startswith("import time:") and "|" in line}
    assert "dicomvault.formats.bkp.reader" in loaded  # the check sees what was loaded
    assert not [m for m in loaded if m in HEAVY_AT_START or m.split(".")[0] in HEAVY_AT_START]


# ----------------------------------------------------------------- where messages go
def run_dv_shell(command: str, *args: str | os.PathLike[str], cwd: Path,
                 env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess[str]:
    """``dicomvault ARGS`` followed by shell redirections ``command`` (e.g.
    ``2>&-``); ``env`` sets variables, or removes those set to None."""
    full = dict(os.environ, DICOMVAULT_DB=str(cwd / "default-db"), DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD="1")
    for name, value in (env or {}).items():
        if value is None:
            full.pop(name, None)
        else:
            full[name] = value
    argv = " ".join(shlex.quote(str(a)) for a in (sys.executable, "-m", "dicomvault", *args))
    return subprocess.run(["/bin/sh", "-c", f"{argv} {command}"], capture_output=True, text=True, env=full,
                          cwd=cwd, timeout=300)


def test_commands_run_with_stderr_closed(tmp_path: Path, pydicom_files: Path) -> None:
    """A script may close stderr (``2>&-``): the command still runs, and its
    messages are dropped, never written to stdout (which may carry JSON)."""
    text = tmp_path / "notes.txt"
    text.write_text("not DICOM")
    stored = run_dv_shell("2>&-", "--db", tmp_path / "db", "import-dicom", pydicom_files / "CT_small.dcm",
                          text, cwd=tmp_path)
    assert stored.returncode == 1, stored.stdout  # partly done: the text file is rejected
    assert "partly done" in stored.stdout and "rejected" not in stored.stdout.split("\n")[0]
    listed = run_dv_shell("2>&-", "--db", tmp_path / "db", "ls", "--json", cwd=tmp_path)
    assert listed.returncode == 0
    json.loads(listed.stdout)
    failed = run_dv_shell("2>&-", "--db", tmp_path / "db", "import-db", tmp_path / "missing.bkp", "--json",
                          cwd=tmp_path)
    assert failed.returncode == 2
    assert "dicomvault: error" not in failed.stdout
    assert json.loads(failed.stdout)["exit_code"] == 2


def test_with_json_a_failed_command_still_prints_json(cli, tmp_path: Path) -> None:
    """A script reading --json output gets JSON when the command stops on an
    error: the message and the exit code (stderr has the usual line)."""
    missing = tmp_path / "missing.bkp"
    res = cli("--db", tmp_path / "db", "import-db", missing, "--json")
    assert res.code == 2 and res.err.startswith("dicomvault: error: ")
    out = json.loads(res.out)
    assert out["exit_code"] == 2 and "missing.bkp" in out["error"]
    usage = cli("ls", "--json", "--no-such-option")
    assert usage.code == 64 and json.loads(usage.out)["exit_code"] == 64
    plain = cli("--db", tmp_path / "db", "import-db", missing)
    assert plain.code == 2 and plain.out == ""  # without --json, stdout stays empty


def test_problem_lines_print_names_as_they_are(tmp_path: Path, pydicom_files: Path) -> None:
    """Through rich (asked for by FORCE_COLOR on a pipe, as in CI logs) or
    not, a file name is printed as it is: no emoji codes, no markup."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(pydicom_files / "CT_small.dcm", folder)
    (folder / "a:smile:[b]x.txt").write_text("not DICOM")
    for force in ("1", None):
        env = {"FORCE_COLOR": force, "TTY_COMPATIBLE": None}
        db = tmp_path / f"db-{force}"
        proc = run_dv_shell("", "--db", db, "import-dicom", folder, cwd=tmp_path, env=env)
        assert proc.returncode == 1, proc.stderr
        assert "a:smile:[b]x.txt" in proc.stderr, (env, proc.stderr)
        assert ("\x1b[" in proc.stderr) == bool(force)  # the progress display, where asked for


# ----------------------------------------------------------------- help and version
def test_python_dash_m_help(tmp_path: Path) -> None:
    proc = run_dv("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: dicomvault")
    for command in ("import-dicom", "ls", "select", "attach", "annotate", "export-db", "import-db"):
        assert command in proc.stdout


def test_subcommand_help_and_version(tmp_path: Path) -> None:
    sub = run_dv("import-dicom", "--help", cwd=tmp_path)
    assert sub.returncode == 0, sub.stderr
    assert "--on-conflict" in sub.stdout
    version = run_dv("--version", cwd=tmp_path, console_script=True)
    assert version.returncode == 0
    assert version.stdout.startswith("dicomvault ")


def test_no_command_is_a_usage_error(tmp_path: Path) -> None:
    proc = run_dv(cwd=tmp_path)
    assert proc.returncode == 64
    assert "usage:" in proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------- exit codes
def test_exit_code_0_done(cli, tmp_path: Path, pydicom_files: Path) -> None:
    result = cli("--db", tmp_path / "db", "import-dicom", pydicom_files / "CT_small.dcm")
    assert (result.code, result.err) == (0, "")


def test_exit_code_1_partly_done(cli, tmp_path: Path, pydicom_files: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not DICOM")
    result = cli("--db", tmp_path / "db", "import-dicom", pydicom_files / "CT_small.dcm", text)
    assert result.code == 1
    assert "Traceback" not in result.err
    assert "partly done" in result.out


def test_exit_code_2_failed(cli, tmp_path: Path) -> None:
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    result = cli("--db", tmp_path / "db", "import-dicom", empty)
    assert result.code == 2
    assert "Traceback" not in result.err
    assert "failed" in result.out


@pytest.mark.parametrize("content", [None, b"not a backup at all\n" * 10, b"\0" * 4096])
def test_unreadable_backup_is_a_clean_failure(cli, tmp_path: Path, content: bytes | None) -> None:
    bkp = tmp_path / "in.bkp"
    if content is not None:
        bkp.write_bytes(content)
    result = cli("--db", tmp_path / "db", "import-db", bkp)
    assert result.code == 2
    assert_clean_error(result.err)


# read-only: "no database there" (a usage error); storing: refuses to create one there
NOT_A_DATABASE = [(["ls", "--whole"], 64), (["import-dicom", "nothing-here"], 2)]


@pytest.mark.parametrize(("command", "code"), NOT_A_DATABASE)
def test_database_path_that_is_a_file_is_a_clean_failure(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         command: list[str], code: int) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nothing-here").mkdir()
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    result = cli("--db", not_a_dir, *command)
    assert result.code == code, result.err
    assert_clean_error(result.err)
    assert not_a_dir.read_text() == "x"


@pytest.mark.parametrize(("command", "code"), NOT_A_DATABASE)
def test_foreign_folder_is_not_taken_over(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          command: list[str], code: int) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nothing-here").mkdir()
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8\xff")
    result = cli("--db", folder, *command)
    assert result.code == code, result.err
    assert_clean_error(result.err)
    assert [p.name for p in folder.iterdir()] == ["holiday.jpg"]


USAGE_ERRORS = [
    ["import-dicom", "--bogus", "x"],
    ["frobnicate"],
    ["import-dicom"],
    ["import-dicom", "x", "--on-conflict", "maybe"],
    ["export-db", OUT],
    ["export-db", OUT, "--whole", "--study", "1.2.3"],
    ["export-db", OUT, "--whole", "--selected"],
    ["export-db", OUT, "--selected"],  # the list is empty
    ["export-db", "out.zip", "--whole"],
    ["ls", "--whole", "--study", "1.2.3"],
    ["ls", "--date-from", "yesterday"],
    ["ls", "--date-from", "2020-13-45"],
    ["ls", "--level", "pixel"],
    ["--json", "ls", "--whole", "--series", "1.2.3"],
    ["import-db", "in.bkp", "--selected"],
    ["select", "set"],
    ["select", "frob"],
    ["select", "set", "--modality", "NO-SUCH-MODALITY"],
    ["annotate", "--comment", "x"],
    ["annotate", "--study", "1.2.3", "--field", "no-equals-sign"],
    ["annotate", "--study", "1.2.3", "--series", "1.2.4", "--comment", "x"],
    ["annotate", "--study", "1.2.3.4.5.6.7", "--comment", "no such study"],
    ["attach", "missing-file.csv", "--study", "1.2.3"],
    ["--db"],
]


def test_a_usage_error_names_the_program_once(cli) -> None:  # type: ignore[no-untyped-def]
    top = cli("frob")
    assert top.code == 64 and top.err.startswith("dicomvault: error: argument COMMAND: invalid choice")
    sub = cli("import-dicom", "x", "--on-conflict", "maybe")
    assert sub.code == 64 and sub.err.startswith("dicomvault: error: import-dicom: argument --on-conflict")
    assert "dicomvault: error: dicomvault" not in top.err + sub.err


@pytest.mark.parametrize("argv", USAGE_ERRORS, ids=lambda a: " ".join(a) or "(none)")
def test_usage_errors_exit_64(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    EmbeddedDatabase(tmp_path / "default-db").close()  # there, and empty: the mistake is in the arguments
    result = cli(*argv)
    assert result.code == 64, (result.out, result.err)
    assert_clean_error(result.err)
    if "--json" in argv:  # the error as JSON, for the script that asked for JSON
        assert json.loads(result.out)["exit_code"] == 64
    else:
        assert result.out == ""
    assert not (tmp_path / OUT).exists()
    assert not (tmp_path / "out.zip").exists()


@pytest.mark.parametrize("argv", [
    ["ls"],
    ["ls", "--whole", "--level", "instance"],
    ["export-db", OUT, "--whole"],
    ["export-dicom", "out-folder", "--whole"],
    ["select", "add-all"],
    ["compare", "other.bkp"],
    ["replicate", "--to", "copy-db", "--whole"],
    ["cstore", "--to", "PACS@127.0.0.1:1", "--whole"],
], ids=lambda a: " ".join(a))
def test_a_mistyped_database_is_named_and_not_created(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      argv: list[str]) -> None:
    """Only commands that store into the database create it: any other one given a path where there
    is none says so (a mistyped --db), instead of showing, exporting or sending an empty database."""
    monkeypatch.chdir(tmp_path)
    typo = tmp_path / "vualt"
    result = cli("--db", typo, *argv)
    assert result.code == 64, (result.out, result.err)
    assert_clean_error(result.err)
    assert f"no dicomvault database at {typo}" in result.err
    assert not typo.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_usage_error_changes_nothing(cli, tmp_path: Path, pydicom_files: Path) -> None:
    db = tmp_path / "db"
    assert cli("--db", db, "import-dicom", pydicom_files / "CT_small.dcm").code == 0
    assert cli("--db", db, "select", "add-all").code == 0
    before = cli("--db", db, "select", "show", "--json").json()
    result = cli("--db", db, "select", "set", "--modality", "NO-SUCH-MODALITY")
    assert result.code == 64
    assert cli("--db", db, "select", "show", "--json").json() == before


def test_main_runs_many_times_in_one_process(cli, tmp_path: Path) -> None:
    """Scripts and tests call main() repeatedly: each run logs once, to the
    stderr of its own time."""
    text = tmp_path / "notes.txt"
    text.write_text("not DICOM")
    runs = [cli("-v", "--db", tmp_path / "db", "import-dicom", text) for _ in range(3)]
    assert [r.code for r in runs] == [2, 2, 2]
    assert runs[0].err == runs[1].err == runs[2].err
    assert "Traceback" not in runs[2].err


# ----------------------------------------------------------------- JSON output
def test_json_output_parses(cli, tmp_path: Path, pydicom_files: Path) -> None:
    db, csv = tmp_path / "db", tmp_path / "voi.csv"
    csv.write_text("roi,volume_ml\n1,12.5\n")
    ingest = cli("--db", db, "import-dicom", pydicom_files / "CT_small.dcm", pydicom_files / "MR_small.dcm",
                 "--json")
    assert ingest.code == 0
    assert ingest.json()["counts"] == {"instance": {"stored": 2}}
    outputs = {"import-dicom": ingest.out}
    series = cli("--db", db, "ls", "--whole", "--json").json()
    study = series[0]["children"][0]["uid"]
    commands = {
        "ls patient": ["ls", "--whole", "--level", "patient", "--json"],
        "ls instance": ["--json", "ls", "--whole", "--level", "instance"],
        "select": ["select", "add-all", "--json"],
        "select show": ["select", "show", "--json"],
        "annotate": ["annotate", "--study", study, "--tag", "qc", "--json"],
        "attach": ["attach", csv, "--study", study, "--json"],
        "export-db": ["export-db", tmp_path / "all.bkp", "--whole", "--json"],
        "import-db dry": ["import-db", tmp_path / "all.bkp", "--dry-run", "--json"],
        "plugins": ["plugins", "--json"],
    }
    for name, argv in commands.items():
        result = cli("--db", db, *argv)
        assert result.code == 0, (name, result.err)
        outputs[name] = result.out
    restored = cli("--db", tmp_path / "db2", "import-db", tmp_path / "all.bkp", "--json")
    assert restored.code == 0
    outputs["import-db"] = restored.out
    for name, out in outputs.items():
        assert out.count("\n") == 1, f"{name}: JSON output must be one document on one line"
        json.loads(out)
    exported = json.loads(outputs["export-db"])["details"]
    assert exported["file size"] == (tmp_path / "all.bkp").stat().st_size  # the .bkp, not the DICOM bytes
    text = cli("--db", db, "export-db", tmp_path / "again.bkp", "--whole")
    assert text.code == 0 and f"file size: {(tmp_path / 'again.bkp').stat().st_size}" in text.out
    assert not [line for line in text.out.splitlines() if line.rstrip().endswith(":")]  # no empty detail
    assert json.loads(outputs["import-db"])["counts"]["instance"] == {"stored": 2}
    assert json.loads(outputs["ls patient"])[0]["level"] == "patient"


# ----------------------------------------------------------------- privacy
def _patient_values(paths: list[Path]) -> set[str]:
    values = set()
    for p in paths:
        ds = pydicom.dcmread(p, force=True, stop_before_pixels=True)
        name = str(ds.get("PatientName") or "")
        values |= {name, str(ds.get("PatientID") or ""), str(ds.get("PatientBirthDate") or "")}
        values |= {part for part in name.replace("=", "^").split("^") if len(part) >= 6}
    return {v for v in values if len(v) >= 4}


@pytest.mark.slow
def test_verbose_logs_hold_no_patient_data(tmp_path: Path, pydicom_files: Path) -> None:
    data_store = next(Path(f) for f in real_dicom_folders() if "data_store" in f)
    charset = pydicom_files.parent / "charset_files"
    chosen = [pydicom_files / "CT_small.dcm", pydicom_files / "rtplan.dcm", data_store / "MR2_J2KI.dcm",
              data_store / "bad_sequence.dcm", charset / "chrX1.dcm", charset / "chrH31.dcm",
              charset / "chrJapMulti.dcm", pydicom_files / "dicomdirtests" / "DICOMDIR"]
    src = tmp_path / "in"
    src.mkdir()
    for i, path in enumerate(chosen):
        shutil.copy(path, src / f"file{i}")
    # a conflict (same UIDs, other bytes) and a text file, so that problem lines are printed too
    ds = pydicom.dcmread(pydicom_files / "CT_small.dcm")
    ds.StudyDescription = "edited"
    ds.save_as(src / "zz-variant")
    (src / "zz-notes.txt").write_text("not DICOM")
    secrets = _patient_values([p for p in chosen if p.name != "DICOMDIR"])
    secrets = {s for s in secrets if s not in str(tmp_path)}
    assert len(secrets) >= 8
    csv = tmp_path / "voi.csv"
    csv.write_text("roi\n1\n")

    errs = []
    ingest = run_dv("-v", "--db", "db", "import-dicom", src, cwd=tmp_path)
    assert ingest.returncode == 1, ingest.stderr
    errs.append(ingest.stderr)
    tree = json.loads(run_dv("--db", "db", "ls", "--whole", "--json", cwd=tmp_path).stdout)
    patient_id = next(p["label"]["patient_id"] for p in tree if p["label"]["patient_id"])
    study = tree[0]["children"][0]["uid"]
    for argv in (["-vv", "ls", "--whole"], ["-v", "ls", "--whole", "--level", "instance"],
                 ["-v", "ls", "--patient", patient_id],
                 ["-v", "select", "add", "--patient", patient_id], ["-v", "select", "show"],
                 ["-v", "annotate", "--patient", patient_id, "--comment", "seen", "--field", "cohort=A"],
                 ["-v", "attach", csv, "--study", study],
                 ["-vv", "export-db", "sel.bkp", "--selected"], ["-v", "export-db", "all.bkp", "--whole"],
                 ["-vv", "import-db", "all.bkp", "--db", "db2"],
                 ["-v", "import-db", "all.bkp", "--db", "db2", "--dry-run"],
                 ["-v", "import-dicom", src, "--on-conflict", "fail"],
                 ["-v", "annotate", "--patient", "no-such-patient", "--comment", "x"]):
        proc = run_dv("--db", "db", *argv, cwd=tmp_path)
        assert "Traceback" not in proc.stderr, argv
        errs.append(proc.stderr)
    listing = run_dv("--db", "db", "ls", "--whole", cwd=tmp_path).stdout
    assert any(s in listing for s in secrets), "the patients must be in the database, or this proves nothing"
    stderr = "\n".join(errs)
    assert "conflict" in stderr and "zz-notes.txt" in stderr, "problem lines were expected on stderr"
    leaked = sorted(s for s in secrets if s in stderr)
    assert not leaked, f"{len(leaked)} patient value(s) appear on stderr"


# ----------------------------------------------------------------- private files
def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.lstat().st_mode)
            for p in [root, *root.rglob("*")]}


@pytest.mark.slow
def test_files_and_folders_created_are_private(tmp_path: Path, pydicom_files: Path) -> None:
    tmp_path.chmod(0o755)
    csv = tmp_path / "voi.csv"
    csv.write_text("roi\n1\n")
    out = tmp_path / "backups"
    out.mkdir(mode=0o755)
    db = tmp_path / "new" / "nested" / "db"
    umask = 0o022  # a typical umask that would make new files world-readable
    assert run_dv("--db", db, "import-dicom", pydicom_files / "CT_small.dcm", pydicom_files / "MR_small.dcm",
                  cwd=tmp_path, umask=umask).returncode == 0
    tree = json.loads(run_dv("--db", db, "ls", "--whole", "--json", cwd=tmp_path, umask=umask).stdout)
    study = tree[0]["children"][0]["uid"]
    assert run_dv("--db", db, "attach", csv, "--study", study, cwd=tmp_path, umask=umask).returncode == 0
    assert run_dv("--db", db, "annotate", "--study", study, "--tag", "x", cwd=tmp_path,
                  umask=umask).returncode == 0
    assert run_dv("--db", db, "export-db", out / "all.bkp", "--whole", cwd=tmp_path,
                  umask=umask).returncode == 0
    assert run_dv("--db", tmp_path / "db2", "import-db", out / "all.bkp", cwd=tmp_path,
                  umask=umask).returncode == 0
    created = {**_modes(tmp_path / "new"), **_modes(tmp_path / "db2"),
               "backups/all.bkp": stat.S_IMODE((out / "all.bkp").stat().st_mode)}
    assert len(created) > 10
    public = {path: oct(mode) for path, mode in created.items() if mode & 0o077}
    assert not public, f"readable or writable by others: {public}"


def test_the_summary_skips_empty_details(capsys: pytest.CaptureFixture[str]) -> None:
    from dicomvault.cli.summary import print_summary
    from dicomvault.engine import Report

    print_summary(Report(operation="move", details={"left in source": [], "file": "x.bkp", "note": ""}))
    out = capsys.readouterr().out
    assert "  file: x.bkp" in out and "left in source" not in out and "note" not in out


def test_compare_says_which_side_lacks_or_differs(cli, tmp_path: Path, pydicom_files: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    ct, mr = pydicom_files / "CT_small.dcm", pydicom_files / "MR_small.dcm"
    assert cli("--db", a, "-q", "import-dicom", ct, mr).code == 0
    assert cli("--db", b, "-q", "import-dicom", pydicom_files / "CT_small.dcm").code == 0
    ct_study = pydicom.dcmread(pydicom_files / "CT_small.dcm", stop_before_pixels=True).StudyInstanceUID
    assert cli("--db", a, "-q", "annotate", "--study", ct_study, "--comment", "read").code == 0
    res = cli("--db", a, "compare", b, "--whole", "--json")
    reasons = {(p["what"], p["reason"]) for p in res.json()["problems"]}
    assert res.code != 0 and reasons == {("instance", "missing in the other"),
                                         ("attributes", "missing in the other")}, reasons
    assert cli("--db", b, "-q", "annotate", "--study", ct_study, "--comment", "unread").code == 0
    res = cli("--db", b, "compare", a, "--whole", "--json")
    reasons = {(p["what"], p["reason"]) for p in res.json()["problems"]}
    assert reasons == {("instance", "only in the other (unexpected extra)"),
                       ("attributes", "differs in the other")}, reasons


@pytest.mark.parametrize(("argv", "json_out"), [
    (["--json"], True),  # no command
    (["--js", "annotate"], True),  # a prefix argparse takes for --json
    (["annotate", "--json", "--comment"], True),
    (["import-dicom", "--bogus", "--", "--json"], False),  # a path after --, not the option
])
def test_json_is_honoured_as_argparse_reads_it(cli, argv: list[str], json_out: bool) -> None:  # type: ignore[no-untyped-def]
    res = cli(*argv)
    assert res.code == 64
    if json_out:
        assert json.loads(res.out)["exit_code"] == 64
    else:
        assert res.out == ""


def test_closed_or_broken_stdout_is_no_traceback(tmp_path: Path) -> None:
    golden = Path(__file__).parent / "golden" / "bkp" / "v1" / "basic.bkp"
    closed = run_dv_shell(">&-", "bkp", "inspect", golden, cwd=tmp_path)
    assert closed.returncode == 0 and "Traceback" not in closed.stderr, closed.stderr
    closed = run_dv_shell(">&-", "--json", "plugins", cwd=tmp_path)
    assert closed.returncode == 0 and "Traceback" not in closed.stderr, closed.stderr
    # a reader that goes away at once: no traceback, no "Exception ignored" at exit
    for args in (["plugins"], ["--json", "bkp", "inspect", golden]):
        gone = run_dv_shell("| (exec 0<&-; sleep 0.2)", *args, cwd=tmp_path)
        assert "Traceback" not in gone.stderr and "Exception ignored" not in gone.stderr, gone.stderr
