"""``move``: replicate, then delete from the source only what the target
confirmed. What the target refused or could not confirm stays in the source
and is listed; SIGKILL at any moment loses nothing, and a re-run converges.
Every check reads the databases with plain SQL and hashlib."""
from __future__ import annotations

import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from replicas import catalog, new_pg_url, verified
from test_replicate import annotated, fresh_copy  # noqa: F401  (a fixture and a helper)
from test_roundtrip import run


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD", "1")


def test_move_leaves_what_the_target_refused_or_failed(annotated: Path, tmp_path: Path) -> None:  # noqa: F811
    src = fresh_copy(annotated, tmp_path)
    original = verified(src)
    uids = sorted(original)
    series_of = {u: r[1] for u, r in catalog(src)["instances"].items()}
    refused = uids[3]
    broken = next(u for u in uids[4:] if series_of[u] != series_of[refused])  # not copied beforehand
    # The target already holds other bytes under one UID: a conflict, refused under the default policy.
    dst = tmp_path / "dst"
    assert run("--db", src, "replicate", "--to", dst, "--series", series_of[refused]).code == 0
    other_sha = original[uids[0]]
    shutil.copy(src / "store" / other_sha[:2] / other_sha, _dir(dst / "store" / other_sha[:2]))
    with sqlite3.connect(dst / "catalog.sqlite") as conn:
        conn.execute("UPDATE instances SET sha256 = ? WHERE sop_uid = ?", (other_sha, refused))
    # One source file is damaged on disk: the target's SHA-256 check fails on it.
    bad = src / "store" / original[broken][:2] / original[broken]
    data = bad.read_bytes()
    bad.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))

    res = run("--db", src, "move", "--to", dst, "--whole", "--json")
    assert res.code == 1, res.err
    report = res.json()
    assert report["details"]["left in source"] == sorted([refused, broken])
    assert {(p["item"], p["outcome"]) for p in report["problems"]} == {(refused, "conflict"),
                                                                        (broken, "failed")}
    assert refused in res.err and broken in res.err  # named on stderr too
    assert report["details"]["moved"] == len(uids) - 2
    assert set(catalog(src)["instances"]) == {refused, broken}
    assert verified(src) == {refused: original[refused]}  # still there, untouched (the damaged one too)
    moved = verified(dst)
    for uid in uids:
        if uid not in (refused, broken):
            assert moved[uid] == original[uid]
    assert moved[refused] == other_sha and broken not in moved


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_move_to_postgres_and_back(annotated: Path, postgres_server, tmp_path: Path) -> None:  # noqa: F811
    src = fresh_copy(annotated, tmp_path)
    original, attrs = verified(src), catalog(src)["attributes"]
    pg = new_pg_url(postgres_server, tmp_path)
    res = run("--db", src, "move", "--to", pg, "--whole", "--json")
    assert res.code == 0, res.err
    assert res.json()["details"]["moved"] == len(original)
    assert catalog(src)["instances"] == {} and verified(pg) == original
    assert catalog(pg)["attributes"] == attrs
    back = tmp_path / "back"
    res = run("--db", pg, "move", "--to", back, "--whole")
    assert res.code == 0, res.err
    assert catalog(pg)["instances"] == {} and verified(back) == original


def _move(src: Path, dst: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "dicomvault", "--db", str(src), "-q", "move", "--to",
                             dst, "--whole"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["embedded", "postgresql"])
def test_move_killed_at_random_points(kind: str, annotated: Path, postgres_server,  # noqa: F811
                                      tmp_path: Path) -> None:
    iterations = int(os.environ.get("DICOMVAULT_KILL_ITERATIONS", "12"))
    seed = int(os.environ.get("DICOMVAULT_KILL_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    original = verified(annotated)
    dst = str(tmp_path / "dst") if kind == "embedded" else new_pg_url(postgres_server, tmp_path)
    # How long one uninterrupted run takes here (into a scratch target), to aim the kills.
    scratch = fresh_copy(annotated, tmp_path / "scratch")
    started = time.monotonic()
    assert _move(scratch, str(tmp_path / "scratch-dst")).wait(timeout=300) == 0
    duration = time.monotonic() - started
    src = tmp_path / "src"
    kills = []
    for i in range(iterations):
        if not src.exists() or not catalog(src)["instances"]:
            shutil.rmtree(src, ignore_errors=True)
            shutil.copytree(annotated, src)  # everything back in the source: the next run has work to do
        proc = _move(src, dst)
        delay = rng.uniform(0.1, 1.1) * duration
        time.sleep(delay)
        proc.kill()
        kills.append((round(delay, 3), proc.wait()))
        in_src, in_dst = verified(src), (verified(dst) if Path(dst).exists() or kind != "embedded" else {})
        lost = [u for u, sha in original.items() if in_src.get(u) != sha and in_dst.get(u) != sha]
        assert not lost, f"seed {seed}, kill {i} after {delay:.3f}s: lost {lost}"
    final = _move(src, dst).wait(timeout=300)
    assert final == 0, f"seed {seed}"
    assert catalog(src)["instances"] == {}
    assert verified(dst) == original  # each once: catalog() asserts there are no duplicate rows
    assert catalog(dst)["attributes"] == catalog(annotated)["attributes"]
    assert any(code == -9 for _delay, code in kills), kills  # at least some kills hit a running move


def test_move_refuses_what_it_cannot_do(annotated: Path, tmp_path: Path) -> None:  # noqa: F811
    src = fresh_copy(annotated, tmp_path)
    before = verified(src)
    res = run("--db", src, "move", "--to", f"sqlite:{src}/../src", "--whole")
    assert res.code == 64 and "same database" in res.err
    bkp = tmp_path / "all.bkp"
    assert run("--db", src, "export-db", bkp, "--whole").code == 0
    res = run("move", "--from", bkp, "--to", tmp_path / "dst", "--whole")
    assert res.code == 64 and "cannot delete" in res.err
    assert verified(src) == before
