"""Helpers for the replicate/move tests: PostgreSQL databases made for one
test, and what a database holds read with plain SQL and hashlib (never
with dicomvault's own code), so a bug in dicomvault cannot hide itself."""
from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psycopg

CATALOG_SQL = {
    "patients": "SELECT key, patient_id, issuer, name, birth_date, sex FROM patients",
    "studies": ("SELECT st.study_uid, p.key, st.date, st.time, st.study_id, st.accession, "
                "st.description FROM studies st JOIN patients p ON st.patient = p.id"),
    "series": ("SELECT se.series_uid, st.study_uid, se.modality, se.number, se.description "
               "FROM series se JOIN studies st ON se.study = st.id"),
    "instances": ("SELECT i.sop_uid, se.series_uid, i.sop_class_uid, i.transfer_syntax, i.number, i.size, "
                  "i.sha256, i.imported_at, i.origin FROM instances i JOIN series se ON i.series = se.id"),
    "attributes": "SELECT level, uid, comment, tags, fields FROM attributes",
    "attachments": ("SELECT attachment_id, level, uid, name, media_type, size, sha256, created_at "
                    "FROM attachments"),
}


def new_pg_url(server: object, tmp_path: Path, name: str = "") -> str:
    """A fresh, empty PostgreSQL database in the session's cluster, with its store under tmp_path."""
    name = name or "t" + uuid.uuid4().hex[:12]
    with psycopg.connect(server.dsn, autocommit=True) as conn:  # type: ignore[attr-defined]
        conn.execute(f'CREATE DATABASE "{name}"')
    base = server.dsn.rsplit("/", 1)[0]  # type: ignore[attr-defined]
    return f"{base}/{name}?store={tmp_path / (name + '-store')}"


def _rows(where: str | Path) -> dict[str, list[tuple]]:
    where = str(where)
    if where.startswith("postgresql://"):
        conninfo = where.split("?", 1)[0]
        with psycopg.connect(conninfo) as conn:
            if conn.execute("SELECT to_regclass('instances')").fetchone()[0] is None:  # type: ignore[index]
                return {k: [] for k in CATALOG_SQL}  # no schema yet (a run killed before creating it)
            return {k: [tuple(r) for r in conn.execute(q)] for k, q in CATALOG_SQL.items()}
    with contextlib.closing(sqlite3.connect(Path(where) / "catalog.sqlite")) as conn:
        return {k: [tuple(r) for r in conn.execute(q)] for k, q in CATALOG_SQL.items()}


def store_dir(where: str | Path) -> Path:
    where = str(where)
    if where.startswith("postgresql://"):
        return Path(parse_qs(urlsplit(where).query)["store"][0]) / "store"
    return Path(where) / "store"


def catalog(where: str | Path) -> dict[str, dict]:
    """Everything the catalog holds, keyed by identity (row ids left out)."""
    rows = _rows(where)
    out: dict[str, dict] = {k: {r[0]: r for r in rows[k]} for k in ("patients", "studies", "series",
                                                                     "instances", "attachments")}
    out["attributes"] = {(r[0], r[1]): (r[2], json.loads(r[3]), json.loads(r[4])) for r in rows["attributes"]}
    for k in ("instances", "series", "attachments"):
        assert len(out[k]) == len(rows[k]), f"duplicate {k} rows"
    return out


def file_sha(where: str | Path, sha: str) -> str | None:
    """The SHA-256 of the bytes stored under a digest, hashed from disk."""
    path = store_dir(where) / sha[:2] / sha
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def verified(where: str | Path) -> dict[str, str]:
    """SOP UID -> SHA-256 of every instance whose stored bytes match the catalog."""
    cat = catalog(where)
    return {uid: r[6] for uid, r in cat["instances"].items() if file_sha(where, r[6]) == r[6]}
