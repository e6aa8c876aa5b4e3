"""Third-party plugins, loaded the way a user installs them: a distribution
on the path whose ``entry_points.txt`` declares the group ``dicomvault``.

The plugin below is written against ``dicomvault.engine`` only (checked);
the CLI runs in a subprocess with plugin autoloading on.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import inspect
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dicomvault.engine
from dicomvault.engine import hookspecs, interfaces, make_plugin_manager

PLUGIN = '''
"""A third-party dicomvault plugin, written against dicomvault.engine only.

The target ``myscheme:FOLDER`` writes each instance's bytes to FOLDER (named
by SHA-256) and one JSON line per instance to FOLDER/instances.jsonl.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from dicomvault.engine import Event, Item, Kind, Outcome, Report, hookimpl

SCHEME = "myscheme:"


class FolderTarget:
    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.description = f"myscheme folder {folder}"
        self.lines: dict[str, dict] = {}

    def lookup(self, sop_uid):
        line = self.lines.get(sop_uid)
        return line["sha256"] if line else None

    def put_instance(self, item: Item, policy):
        rec = item.instance
        held = self.lookup(rec.sop_uid)
        if held is not None:
            return (Outcome.UNCHANGED, "") if held == rec.sha256 else (Outcome.CONFLICT, "")
        self.folder.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        with os.fdopen(fd, "wb") as out, item.open() as src:
            while chunk := src.read(1 << 16):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
        sha = digest.hexdigest()
        if rec.sha256 and sha != rec.sha256:
            os.unlink(tmp)
            return Outcome.FAILED, "the bytes do not match their SHA-256"
        os.replace(tmp, self.folder / (sha + ".dcm"))
        self.lines[rec.sop_uid] = {
            "sop_uid": rec.sop_uid, "series_uid": item.series.series_uid,
            "study_uid": item.study.study_uid, "patient_key": item.patient.key,
            "modality": item.series.modality, "transfer_syntax": rec.transfer_syntax,
            "size": size, "sha256": sha, "file": sha + ".dcm"}
        return Outcome.STORED, ""

    def put_attributes(self, attrs, policy):
        return Outcome.IGNORED, "a folder keeps no database attributes"

    def put_attachment(self, record, open_, policy):
        return Outcome.IGNORED, "a folder keeps no attachments"

    def finish(self, ok: bool) -> None:
        if not ok:
            for line in self.lines.values():
                (self.folder / line["file"]).unlink(missing_ok=True)
            return
        if self.lines:
            text = "".join(json.dumps(v, sort_keys=True) + "\\n" for _k, v in sorted(self.lines.items()))
            (self.folder / "instances.jsonl").write_text(text)


@hookimpl
def dicomvault_register_targets() -> list[Kind]:
    return [Kind(name="myscheme", description="a folder of files plus instances.jsonl (myscheme:FOLDER)",
                 matches=lambda url: url.startswith(SCHEME),
                 open=lambda url, ctx: FolderTarget(url[len(SCHEME):]))]


_items = 0


@hookimpl
def dicomvault_on_event(event: Event) -> None:
    global _items
    after = os.environ.get("MYSCHEME_INTERRUPT_AFTER")
    if after and event.kind == "item":
        _items += 1
        if _items == int(after):
            raise KeyboardInterrupt


@hookimpl
def dicomvault_on_report(report: Report) -> None:
    log = os.environ.get("MYSCHEME_REPORT_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({"operation": report.operation, "counts": report.counts}) + "\\n")
'''

DIST = "dvtest-folder-target"
MODULE = "dvtest_folder_target"


def install(root: Path, module: str, source: str, *, dist: str, entry: str = "myscheme",
            target: str | None = None) -> Path:
    """Lay out a module and its ``*.dist-info`` under ``root`` (what pip
    would install), declaring ``entry = target`` in the group dicomvault."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[dicomvault]\n{entry} = {target or module}\n")
    (info / "RECORD").write_text("")
    return root


def dv(*args: object, path: Path, env: dict[str, str] | None = None,
       autoload: bool = True) -> subprocess.CompletedProcess[str]:
    """``python -m dicomvault ARGS`` in a fresh process with ``path`` on
    PYTHONPATH and plugin autoloading on (unless told otherwise)."""
    e = dict(os.environ)
    e.pop("DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD", None)
    if not autoload:
        e["DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    e["PYTHONPATH"] = os.pathsep.join([str(path), *filter(None, [e.get("PYTHONPATH")])])
    e.update(env or {})
    # run next to the plugin, so that a stray relative path never lands in the working tree
    return subprocess.run([sys.executable, "-m", "dicomvault", *map(str, args)], env=e, text=True,
                          capture_output=True, timeout=300, cwd=path.parent)


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr, res.stderr
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("dicomvault: error: "), res.stderr
    return lines[0]


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    return install(tmp_path / "site", MODULE, PLUGIN, dist=DIST)


@pytest.fixture
def database(cli, tmp_path: Path, real_dicom: list[str]) -> Path:
    db = tmp_path / "db"
    res = cli("--db", db, "import-dicom", *real_dicom, "--json")
    assert res.json()["counts"]["instance"]["stored"] > 100, res.err
    return db


def db_instances(db: Path) -> dict[str, tuple[str, str, str, str, str, str, int]]:
    """SOP UID -> (series, study, patient key, modality, transfer syntax,
    sha256, size), read with plain SQL."""
    with contextlib.closing(sqlite3.connect(db / "catalog.sqlite")) as conn:
        return {r[0]: r[1:] for r in conn.execute(
            "SELECT i.sop_uid, se.series_uid, st.study_uid, p.key, se.modality, i.transfer_syntax, "
            "i.sha256, i.size FROM instances i JOIN series se ON i.series = se.id "
            "JOIN studies st ON se.study = st.id JOIN patients p ON st.patient = p.id")}


# ---------------------------------------------------------------------- a working plugin


def test_plugin_is_listed(plugin: Path, tmp_path: Path) -> None:
    res = dv("plugins", "--json", path=plugin)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert {"name": "myscheme", "origin": f"{DIST} 1.0"} in info["plugins"]
    assert "myscheme" in {k["name"] for k in info["targets"]}
    builtin = {p["name"] for p in info["plugins"] if p["origin"] == "built-in"}
    assert "dicomvault.plugins.bkp_plugin" in builtin
    text = dv("plugins", path=plugin)
    assert text.returncode == 0 and "myscheme" in text.stdout and DIST in text.stdout
    # negative control: with autoloading off the plugin is not there
    off = dv("plugins", "--json", path=plugin, autoload=False)
    assert off.returncode == 0
    assert "myscheme" not in {p["name"] for p in json.loads(off.stdout)["plugins"]}


def test_transfer_to_a_plugin_target(plugin: Path, database: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    log = tmp_path / "reports.jsonl"
    res = dv("--db", database, "transfer", "--to", f"myscheme:{out}", "--whole", "--json", path=plugin,
             env={"MYSCHEME_REPORT_LOG": str(log)})
    assert res.returncode == 0, res.stderr
    held = db_instances(database)
    report = json.loads(res.stdout)
    assert report["counts"]["instance"] == {"stored": len(held)}
    assert report["details"]["to"] == f"myscheme folder {out}"

    lines = [json.loads(ln) for ln in (out / "instances.jsonl").read_text().splitlines()]
    assert len(lines) == len(held)
    by_uid = {ln["sop_uid"]: ln for ln in lines}
    assert set(by_uid) == set(held)
    for uid, (series, study, pkey, modality, ts, sha, size) in held.items():
        line = by_uid[uid]
        assert (line["series_uid"], line["study_uid"], line["patient_key"], line["modality"],
                line["transfer_syntax"], line["sha256"], line["size"]) == \
            (series, study, pkey, modality, ts, sha, size)
        written = (out / line["file"]).read_bytes()
        assert hashlib.sha256(written).hexdigest() == sha and len(written) == size
    assert sorted(p.name for p in out.iterdir()) == sorted({ln["file"] for ln in lines} | {"instances.jsonl"})
    # the plugin's report hook saw the same final report
    (logged,) = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert logged == {"operation": "transfer", "counts": report["counts"]}


def test_transfer_a_selection_to_a_plugin_target(plugin: Path, database: Path, tmp_path: Path) -> None:
    held = db_instances(database)
    studies: dict[str, set[str]] = {}
    for uid, row in held.items():
        studies.setdefault(row[1], set()).add(uid)
    study, wanted = max(studies.items(), key=lambda kv: (len(kv[1]), kv[0]))
    assert 1 < len(wanted) < len(held)
    out = tmp_path / "one-study"
    res = dv("--db", database, "transfer", "--to", f"myscheme:{out}", "--study", study, "--json", path=plugin)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(ln) for ln in (out / "instances.jsonl").read_text().splitlines()]
    assert {ln["sop_uid"] for ln in lines} == wanted
    assert {ln["study_uid"] for ln in lines} == {study}
    for ln in lines:
        assert hashlib.sha256((out / ln["file"]).read_bytes()).hexdigest() == held[ln["sop_uid"]][5]


def test_unknown_scheme_without_the_plugin(database: Path, plugin: Path, tmp_path: Path) -> None:
    res = dv("--db", database, "transfer", "--to", f"myscheme:{tmp_path / 'x'}", "--whole", path=plugin,
             autoload=False)
    assert res.returncode == 64
    assert "myscheme" in one_line_error(res)
    assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db", "site"]  # no folder "myscheme:" either


def test_interrupt_from_a_plugin_hook_leaves_no_partial_backup(plugin: Path, database: Path,
                                                              tmp_path: Path) -> None:
    """Ctrl-C (here raised by a plugin's notification hook half-way through
    an export): exit 130, a message, no .bkp and no temporary file."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    res = dv("--db", database, "export-db", out_dir / "whole.bkp", "--whole", path=plugin,
             env={"MYSCHEME_INTERRUPT_AFTER": "100"})
    assert res.returncode == 130, res.stderr
    assert "interrupted" in res.stderr and "Traceback" not in res.stderr
    assert list(out_dir.iterdir()) == []
    # and without the interruption the same command works
    res = dv("--db", database, "export-db", out_dir / "whole.bkp", "--whole", path=plugin)
    assert res.returncode == 0, res.stderr
    assert [p.name for p in out_dir.iterdir()] == ["whole.bkp"]


def test_plugin_uses_only_the_public_engine_api() -> None:
    tree = ast.parse(textwrap.dedent(PLUGIN))
    public = set(dicomvault.engine.__all__)
    seen = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "dicomvault" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "dicomvault":
            assert node.module == "dicomvault.engine"
            names = {a.name for a in node.names}
            assert names <= public, names - public
            seen |= names
    assert {"hookimpl", "Kind", "Outcome"} <= seen


# ---------------------------------------------------------------------- the plugin author's manual


def test_every_hook_spec_has_a_docstring() -> None:
    specs = {name: fn for name, fn in vars(hookspecs).items()
             if callable(fn) and hasattr(fn, f"{hookspecs.PROJECT}_spec")}
    pm = make_plugin_manager(autoload=False)
    hooks = {name for name in vars(pm.hook) if name.startswith("dicomvault_")}
    assert specs and set(specs) == hooks
    for name, fn in specs.items():
        doc = inspect.getdoc(fn) or ""
        assert len(doc.split()) >= 8, f"hook {name} needs a docstring a plugin author can work from"
    assert "entry point" in (hookspecs.__doc__ or "") and "dicomvault" in (hookspecs.__doc__ or "")
    for cls in (interfaces.Source, interfaces.Target, interfaces.Database, interfaces.Kind,
                interfaces.Operation):
        assert len((inspect.getdoc(cls) or "").split()) >= 8, cls.__name__


# ---------------------------------------------------------------------- broken plugins

BROKEN = {
    "import error": ('raise ImportError("this plugin needs the package frobnicate")\n', "frobnicate"),
    "syntax error": ("def oops(:\n", "dvtest_broken"),
    "bad hook signature": ("from dicomvault.engine import hookimpl\n\n@hookimpl\n"
                           "def dicomvault_on_event(event, colour):\n    pass\n", "dicomvault_on_event"),
    "unknown hook": ("from dicomvault.engine import hookimpl\n\n@hookimpl\n"
                     "def dicomvault_register_targetz():\n    return []\n", "dicomvault_register_targetz"),
    "command clash": ("from dicomvault.engine import Operation, hookimpl\n\n@hookimpl\n"
                      "def dicomvault_register_operations():\n"
                      "    return [Operation(name='ls', help='mine', configure=lambda p: None,\n"
                      "                      run=lambda c, a: 0)]\n", "'ls'"),
    "hook raises": ("from dicomvault.engine import hookimpl\n\n@hookimpl\n"
                    "def dicomvault_register_operations():\n    raise RuntimeError('plugin bug 42')\n",
                    "plugin bug 42"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_plugin_gives_a_clear_error(tmp_path: Path, case: str) -> None:
    source, words = BROKEN[case]
    site = install(tmp_path / "site", "dvtest_broken", source, dist="dvtest-broken", entry="broken")
    res = dv("plugins", path=site)
    assert res.returncode == 2, res.stderr
    line = one_line_error(res)
    assert words in line
    assert "plugin" in line.lower()
    # the same error for any command, and the database is not touched
    db = tmp_path / "db"
    res = dv("--db", db, "ls", path=site)
    assert res.returncode == 2 and words in one_line_error(res)
    assert not db.exists()
    # with autoloading off the broken plugin is not loaded at all
    assert dv("plugins", path=site, autoload=False).returncode == 0


def test_missing_plugin_module_gives_a_clear_error(tmp_path: Path) -> None:
    site = install(tmp_path / "site", "dvtest_present", "X = 1\n", dist="dvtest-missing", entry="gone",
                   target="dvtest_not_there")
    res = dv("plugins", path=site)
    assert res.returncode == 2
    assert "dvtest_not_there" in one_line_error(res)
