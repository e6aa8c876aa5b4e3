"""``dicomvault gc``: what interrupted writers leave in a database's file store
(staged copies, files published but never committed) is removed; nothing the
catalog names is ever touched, nor the staged file of a writer still running."""
from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from bkp_synth import Builder, hierarchy, uid
from dicomvault.plugins.embedded.collect import STALE_AFTER, staged_file_is_stale
from replicas import new_pg_url


def _named(db: Path) -> set[str]:
    with sqlite3.connect(db / "catalog.sqlite") as conn:
        rows = conn.execute("SELECT sha256 FROM instances UNION SELECT sha256 FROM attachments")
        return {r[0] for r in rows}


def _store(db: Path) -> set[str]:
    return {p.name for p in (db / "store").glob("*/*")}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_gc_removes_leftovers_and_nothing_else(cli, pydicom_files: Path, tmp_path: Path) -> None:
    db = tmp_path / "db"
    files = [pydicom_files / "CT_small.dcm", pydicom_files / "MR_small.dcm"]
    assert cli("--db", db, "import-dicom", *files).code == 0
    named = _named(db)
    assert len(named) == 2 and _store(db) == named
    before = {p: p.read_bytes() for p in (db / "store").glob("*/*")}

    # a file published by a writer killed before its commit
    orphan = hashlib.sha256(b"orphan").hexdigest()
    (db / "store" / orphan[:2]).mkdir(exist_ok=True)
    (db / "store" / orphan[:2] / orphan).write_bytes(b"orphan")
    host, tmp = socket.gethostname(), db / "tmp"
    gone = tmp / f"in.{host}.{_dead_pid()}.7"
    gone.write_bytes(b"x" * 100)
    running = tmp / f"in.{host}.{os.getpid()}.1"  # this process: still running
    running.write_bytes(b"y")
    elsewhere_new = tmp / "in.other-host.example.1234.5"  # cannot be asked: kept while young
    elsewhere_new.write_bytes(b"z")
    elsewhere_old = tmp / "in.other-host.example.1234.6"
    elsewhere_old.write_bytes(b"zz")
    old = time.time() - STALE_AFTER - 60
    os.utime(elsewhere_old, (old, old))
    stranger = tmp / "notes.txt"  # not a name we write: left alone
    stranger.write_bytes(b"n")

    dry = cli("--db", db, "--json", "gc", "--dry-run")
    assert dry.code == 0, dry.err
    assert dry.json() == {"store_files": 1, "store_bytes": 6, "staged_files": 2, "staged_bytes": 102,
                          "dry_run": True}
    assert (db / "store" / orphan[:2] / orphan).exists() and gone.exists() and elsewhere_old.exists()

    res = cli("--db", db, "gc")
    assert res.code == 0, res.err
    assert "removed 1 store file(s)" in res.out and "2 staged file(s)" in res.out
    assert _store(db) == named
    assert {p: p.read_bytes() for p in (db / "store").glob("*/*")} == before
    assert sorted(p.name for p in tmp.iterdir()) == sorted([running.name, elsewhere_new.name, stranger.name])
    assert cli("--db", db, "--json", "gc").json()["store_files"] == 0


def test_staged_names() -> None:
    now, host = time.time(), socket.gethostname()
    assert not staged_file_is_stale(f"in.{host}.{os.getpid()}.3", 0, now=now)  # running: whatever its age
    assert staged_file_is_stale(f"in.{host}.{_dead_pid()}.3", now, now=now)
    assert not staged_file_is_stale("in.elsewhere.example.12.3", now - 60, now=now)  # cannot be asked
    assert staged_file_is_stale("in.elsewhere.example.12.3", now - STALE_AFTER - 1, now=now)
    assert staged_file_is_stale("in-k2j3h4", now - STALE_AFTER - 1, now=now)  # older mkstemp names
    assert not staged_file_is_stale("in-k2j3h4", now - 60, now=now)
    assert not staged_file_is_stale("catalog.tmp", 0, now=now)


def _kill_while_copying(cmd: list[str], db: Path, env: dict[str, str], after: int) -> None:
    """Start ``cmd`` and SIGKILL it once ``after`` store files exist (or it ends)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if (db / "store").is_dir() and sum(1 for _ in (db / "store").glob("*/*")) >= after:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_gc_after_a_killed_restore(cli, tmp_path: Path) -> None:
    """SIGKILL an import-db while it copies; gc leaves exactly what the catalog
    names, and the restore run again completes."""
    rng = random.Random(3)
    bkp = tmp_path / "big.bkp"
    b = Builder(bkp, frame_size=1 << 20)
    b.patients, b.studies, b.series = hierarchy(1, 1, 4)
    for s, se in enumerate(b.series):
        for i in range(100):
            b.instance(uid(5, s, i), se.series_uid, rng.randbytes(rng.randrange(50_000, 300_000)), i + 1)
    b.finish()
    env = dict(os.environ, DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD="1")
    kills_with_leftovers = 0
    for attempt, after in enumerate((5, 40, 120, 250, 330)):
        db = tmp_path / f"db{attempt}"
        cmd = [sys.executable, "-m", "dicomvault", "--db", str(db), "-q", "import-db", str(bkp)]
        _kill_while_copying(cmd, db, env, after)
        if not (db / "catalog.sqlite").exists():
            continue
        leftovers = bool(_store(db) - _named(db)) or any((db / "tmp").iterdir())
        res = cli("--db", db, "--json", "gc")
        assert res.code == 0, res.err
        removed = res.json()["store_files"] + res.json()["staged_files"]
        assert removed > 0 or not leftovers
        kills_with_leftovers += leftovers
        assert _store(db) == _named(db)
        assert not any((db / "tmp").iterdir())
        res = cli("--db", db, "--json", "import-db", bkp)  # and the restore completes
        assert res.code == 0, res.err
        assert cli("--db", db, "compare", bkp).code == 0
    assert kills_with_leftovers, "no kill left anything behind: the test did not test gc"


def test_gc_on_postgresql(cli, pydicom_files: Path, postgres_server, tmp_path: Path) -> None:
    """The same on a PostgreSQL database: its shared store, under its advisory write lock."""
    pg = new_pg_url(postgres_server, tmp_path)
    assert cli("--db", pg, "import-dicom", pydicom_files / "CT_small.dcm").code == 0
    store = Path(pg.split("store=")[1]) / "store"
    kept = {p.name for p in store.glob("*/*")}
    assert len(kept) == 1
    orphan = hashlib.sha256(b"orphan").hexdigest()
    (store / orphan[:2]).mkdir(exist_ok=True)
    (store / orphan[:2] / orphan).write_bytes(b"orphan")
    res = cli("--db", pg, "--json", "gc")
    assert res.code == 0, res.err
    assert res.json()["store_files"] == 1
    assert {p.name for p in store.glob("*/*")} == kept
