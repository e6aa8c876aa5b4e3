"""The SQLite catalog: patients, studies, series, instances, attributes,
attachments and the persistent selection. Schema and row mapping only."""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import msgspec

from dicomvault.engine import DatabaseError
from dicomvault.engine.types import (
    AttachmentRecord,
    Attributes,
    InstanceRecord,
    PatientRecord,
    SeriesRecord,
    StudyRecord,
)

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS patients (
    id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, patient_id TEXT NOT NULL, issuer TEXT NOT NULL,
    name TEXT NOT NULL, birth_date TEXT NOT NULL, sex TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY, study_uid TEXT UNIQUE NOT NULL,
    patient INTEGER NOT NULL REFERENCES patients(id), date TEXT NOT NULL, time TEXT NOT NULL,
    study_id TEXT NOT NULL, accession TEXT NOT NULL, description TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY, series_uid TEXT UNIQUE NOT NULL,
    study INTEGER NOT NULL REFERENCES studies(id), modality TEXT NOT NULL, number INTEGER,
    description TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY, sop_uid TEXT UNIQUE NOT NULL,
    series INTEGER NOT NULL REFERENCES series(id), sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL, number INTEGER, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
    imported_at TEXT NOT NULL, origin TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances(series, number);
CREATE INDEX IF NOT EXISTS instances_by_sha ON instances(sha256);
CREATE TABLE IF NOT EXISTS attributes (
    level TEXT NOT NULL, uid TEXT NOT NULL, comment TEXT NOT NULL, tags TEXT NOT NULL,
    fields TEXT NOT NULL, PRIMARY KEY (level, uid));
CREATE TABLE IF NOT EXISTS attachments (
    attachment_id TEXT PRIMARY KEY, level TEXT NOT NULL, uid TEXT NOT NULL, name TEXT NOT NULL,
    media_type TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS attachments_by_owner ON attachments(level, uid);
CREATE TABLE IF NOT EXISTS selected (position INTEGER PRIMARY KEY, selection TEXT NOT NULL);
"""

PATIENT_COLS = "p.key, p.patient_id, p.issuer, p.name, p.birth_date, p.sex"
STUDY_COLS = "st.study_uid, p.key, st.date, st.time, st.study_id, st.accession, st.description"
SERIES_COLS = "se.series_uid, st.study_uid, se.modality, se.number, se.description"
INSTANCE_COLS = ("i.sop_uid, se.series_uid, i.sop_class_uid, i.transfer_syntax, i.number, i.size, "
                 "i.sha256, i.imported_at, i.origin")
HIERARCHY_SQL = (f"SELECT {PATIENT_COLS}, {STUDY_COLS}, {SERIES_COLS}, se.id FROM series se "
                 "JOIN studies st ON se.study = st.id JOIN patients p ON st.patient = p.id "
                 "ORDER BY p.name, p.patient_id, st.date, st.study_uid, se.number, se.series_uid")


def connect(path: Path) -> sqlite3.Connection:
    # Switching a new catalog to WAL takes an exclusive lock that SQLite's busy timeout does not
    # always wait for: when another process is creating the same database, try again shortly.
    deadline = time.monotonic() + 60
    while True:
        try:
            return _connect(path)
        except DatabaseError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _connect(path: Path) -> sqlite3.Connection:
    conn: sqlite3.Connection | None = None
    try:
        conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("BEGIN IMMEDIATE")
        for stmt in SCHEMA.split(";"):
            if stmt.strip():
                conn.execute(stmt)
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            conn.execute("ROLLBACK")
            raise DatabaseError(f"the database at {path.parent} has schema version {row[0]}; this "
                                f"release knows up to {SCHEMA_VERSION}: upgrade dicomvault")
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as exc:
        if conn is not None:
            conn.close()
        raise DatabaseError(f"cannot open the catalog {path}: {exc}") from exc
    return conn


def patient_of(row: tuple) -> PatientRecord:  # type: ignore[type-arg]
    return PatientRecord(key=row[0], patient_id=row[1], issuer=row[2], name=row[3],
                         birth_date=row[4], sex=row[5])


def study_of(row: tuple) -> StudyRecord:  # type: ignore[type-arg]
    return StudyRecord(study_uid=row[0], patient_key=row[1], date=row[2], time=row[3],
                       study_id=row[4], accession=row[5], description=row[6])


def series_of(row: tuple) -> SeriesRecord:  # type: ignore[type-arg]
    return SeriesRecord(series_uid=row[0], study_uid=row[1], modality=row[2], number=row[3],
                        description=row[4])


def instance_of(row: tuple) -> InstanceRecord:  # type: ignore[type-arg]
    return InstanceRecord(sop_uid=row[0], series_uid=row[1], sop_class_uid=row[2],
                          transfer_syntax=row[3], number=row[4], size=row[5], sha256=row[6],
                          imported_at=row[7], origin=row[8])


def attributes_of(row: tuple) -> Attributes:  # type: ignore[type-arg]
    return Attributes(level=row[0], uid=row[1], comment=row[2], tags=msgspec.json.decode(row[3]),
                      fields=msgspec.json.decode(row[4]))


def attachment_of(row: tuple) -> AttachmentRecord:  # type: ignore[type-arg]
    return AttachmentRecord(attachment_id=row[0], level=row[1], uid=row[2], name=row[3],
                            media_type=row[4], size=row[5], sha256=row[6], created_at=row[7])


ATTACHMENT_COLS = "attachment_id, level, uid, name, media_type, size, sha256, created_at"
