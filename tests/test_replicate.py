"""``replicate`` between the embedded database and a real PostgreSQL server,
both ways, compared instance by instance (SHA-256, hashed from the stored
bytes) and attribute by attribute with plain SQL; incremental re-runs, the
conflict policy, the schema version, and concurrent ingests."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from dicomvault.plugins.embedded.database import EmbeddedDatabase
from replicas import catalog, new_pg_url, verified
from test_roundtrip import run


@pytest.fixture(scope="module")
def annotated(tmp_path_factory: pytest.TempPathFactory, real_dicom: list[str]) -> Path:
    """The real corpus ingested, with attributes at every level and attachments."""
    root = tmp_path_factory.mktemp("replicate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DICOMVAULT_DB", str(root / "default-db"))
        mp.setenv("DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD", "1")
        db = root / "src"
        assert run("--db", db, "import-dicom", *real_dicom).code == 1  # pydicom ships broken files
        cat = catalog(db)
        inst = sorted(cat["instances"].values())[0]
        series = cat["series"][inst[1]]
        study = cat["studies"][series[1]]
        note = root / "voi.txt"
        note.write_text("VOI liver 1 2 3\n")
        for args in (("annotate", "--study", study[0], "--comment", "reviewed", "--tag", "qa",
                      "--field", "site=lab"),
                     ("annotate", "--series", series[0], "--tag", "keep"),
                     ("annotate", "--instance", inst[0], "--comment", "key image"),
                     ("annotate", "--patient", cat["patients"][study[1]][0], "--field", "trial=T1"),
                     ("attach", note, "--series", series[0])):
            res = run("--db", db, *args)
            assert res.code == 0, res.err
    return db


def fresh_copy(db: Path, tmp_path: Path) -> Path:
    out = tmp_path / "src"
    shutil.copytree(db, out)
    return out


def assert_same(a: str | Path, b: str | Path) -> None:
    """Same catalog, attribute by attribute, and every file's bytes verified on both sides."""
    ca, cb = catalog(a), catalog(b)
    assert ca == cb
    assert set(verified(a)) == set(verified(b)) == set(ca["instances"])


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD", "1")


def test_embedded_to_postgres_and_back(annotated: Path, postgres_server, tmp_path: Path) -> None:
    src = fresh_copy(annotated, tmp_path)
    pg = new_pg_url(postgres_server, tmp_path)
    first = run("--db", src, "replicate", "--to", pg, "--whole", "--json")
    assert first.code == 0, first.err
    counts = first.json()["counts"]
    n = len(catalog(src)["instances"])
    assert counts["instance"] == {"stored": n}
    assert counts["attachment"] == {"stored": 1}
    assert_same(src, pg)
    assert run("--db", src, "compare", pg, "--whole").code == 0

    again = run("--db", src, "replicate", "--to", pg, "--whole", "--json")  # incremental: nothing to copy
    assert again.code == 0 and again.json()["counts"]["instance"] == {"unchanged": n}
    assert again.json()["bytes"] == 0

    back = tmp_path / "back"
    res = run("--db", pg, "replicate", "--to", back, "--whole", "--json")
    assert res.code == 0, res.err
    assert_same(pg, back)
    assert_same(src, back)


def test_selection_and_conflict_policy(annotated: Path, postgres_server, tmp_path: Path) -> None:
    src = fresh_copy(annotated, tmp_path)
    cat = catalog(src)
    per_study: dict[str, int] = {}
    for r in cat["instances"].values():
        per_study[cat["series"][r[1]][1]] = per_study.get(cat["series"][r[1]][1], 0) + 1
    study = max(sorted(per_study), key=lambda s: per_study[s])
    assert per_study[study] >= 3
    pg = new_pg_url(postgres_server, tmp_path)
    assert run("--db", src, "replicate", "--to", pg, "--study", study).code == 0
    got = catalog(pg)
    assert set(got["studies"]) == {study}
    assert got["instances"] == {u: r for u, r in cat["instances"].items()
                                if cat["series"][r[1]][1] == study}
    # Other bytes under one UID in the target: a conflict, left alone unless told to overwrite.
    uid, row = sorted(got["instances"].items())[0]
    other = sorted(r for r in cat["instances"].values() if r[6] != row[6])[0]
    with psycopg.connect(pg.split("?")[0], autocommit=True) as conn:
        conn.execute("UPDATE instances SET sha256 = %s, size = %s WHERE sop_uid = %s",
                     (other[6], other[5], uid))
    store = Path(pg.split("store=")[1])  # the other bytes must exist in its store / "store" / other[6][:2]
    store.mkdir(exist_ok=True)
    shutil.copy(Path(src, "store", other[6][:2], other[6]), store)
    res = run("--db", src, "replicate", "--to", pg, "--study", study, "--json")
    assert res.code == 1
    assert [(p["item"], p["outcome"]) for p in res.json()["problems"]] == [(uid, "conflict")]
    assert catalog(pg)["instances"][uid][6] == other[6]  # untouched
    res = run("--db", src, "replicate", "--to", pg, "--study", study, "--on-conflict", "overwrite", "--json")
    assert res.code == 0 and res.json()["counts"]["instance"]["overwritten"] == 1
    assert catalog(pg)["instances"][uid] == cat["instances"][uid]
    assert verified(pg)[uid] == row[6]


def test_schema_version_and_store_mark(postgres_server, tmp_path: Path) -> None:
    pg = new_pg_url(postgres_server, tmp_path)
    assert run("--db", pg, "ls").code == 0  # opening creates the schema
    with psycopg.connect(pg.split("?")[0]) as conn:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    assert meta["schema_version"] == "1"
    wrong = pg.split("?")[0] + f"?store={tmp_path / 'elsewhere'}"
    res = run("--db", wrong, "ls")
    assert res.code == 2 and "is not the file store" in res.err
    res = run("--db", pg.split("?")[0], "ls")
    assert res.code == 64 and "store=DIR" in res.err
    # A second database may not share the first one's store (each would delete the other's files).
    store = pg.split("store=")[1]
    (Path(store) / "store" / "ab").mkdir()
    other = new_pg_url(postgres_server, tmp_path).split("?")[0] + f"?store={store}"
    res = run("--db", other, "ls")
    assert res.code == 2 and "file store of another database" in res.err
    EmbeddedDatabase(tmp_path / "emb").close()  # nor an embedded database's folder
    fresh = new_pg_url(postgres_server, tmp_path).split("?")[0]
    res = run("--db", f"{fresh}?store={tmp_path / 'emb'}", "ls")
    assert res.code == 2 and "is an embedded database" in res.err


def test_two_processes_ingest_into_one_postgres(real_dicom: list[str], postgres_server,
                                                tmp_path: Path) -> None:
    pg = new_pg_url(postgres_server, tmp_path)
    assert run("--db", pg, "ls").code == 0  # schema in place (creating it concurrently is tested below)
    pg2 = new_pg_url(postgres_server, tmp_path)
    for url in (pg, pg2):
        cmd = [sys.executable, "-m", "dicomvault", "--db", url, "-q", "import-dicom", *real_dicom]
        procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        for p in procs:
            _out, err = p.communicate(timeout=300)
            assert p.returncode in (0, 1), err  # 1: the corpus holds broken and duplicate files
            assert "Traceback" not in err
    ref = tmp_path / "ref"
    run("--db", ref, "import-dicom", *real_dicom)
    want = catalog(ref)
    for url in (pg, pg2):
        got = catalog(url)  # catalog() asserts there are no duplicate rows
        assert set(got["instances"]) == set(want["instances"])
        assert set(verified(url)) == set(want["instances"])
        with psycopg.connect(url.split("?")[0]) as conn:
            for table, col in (("instances", "sop_uid"), ("series", "series_uid"),
                               ("studies", "study_uid"), ("patients", "key")):
                n, distinct = conn.execute(f"SELECT count(*), count(DISTINCT {col}) FROM {table}").fetchone()
                assert n == distinct
