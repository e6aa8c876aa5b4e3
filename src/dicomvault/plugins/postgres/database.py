"""The PostgreSQL database: the embedded database's model and code, with the
catalog in PostgreSQL and the content store in a directory every client
reaches (named by ``?store=`` in the address).

Writers take turns through an advisory lock (see :mod:`.sql`), held from
the moment a batch publishes its first file until its commit, exactly as
the embedded database's writers hold SQLite's write lock; the UNIQUE
constraints back that up. Readers (exports) take a REPEATABLE READ snapshot
and never wait. So several clients can ingest and export at once without
lost updates or duplicate rows.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import psycopg

from dicomvault.engine import DatabaseError
from dicomvault.plugins.embedded.database import EmbeddedDatabase, EmbeddedSource, EmbeddedTarget
from dicomvault.plugins.embedded.store import ContentStore

from . import schema
from .sql import Connection
from .url import parse


class PostgresDatabase(EmbeddedDatabase):
    """A :class:`~dicomvault.engine.Database` whose catalog is in PostgreSQL."""

    def __init__(self, url: str) -> None:  # deliberately not calling the embedded __init__
        self.conninfo, store, self.url = parse(url)
        self.root = Path(store).expanduser()
        os.umask(os.umask(0o077) | 0o077)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.store = ContentStore(self.root)
        pg = self._connect()
        try:
            self.schema_version = schema.migrate(pg, self.root, self.url)
        except BaseException:
            pg.close()
            raise
        self.conn = pg  # type: ignore[assignment]

    def _connect(self) -> Connection:
        try:
            return Connection(self.conninfo)
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot connect to {self.url}: {' '.join(str(exc).split())}") from exc

    def source(self) -> PostgresSource:
        return PostgresSource(self)

    def target(self) -> PostgresTarget:
        return PostgresTarget(self)


class PostgresSource(EmbeddedSource):
    """Reads a selection from one REPEATABLE READ snapshot."""

    def __init__(self, db: PostgresDatabase, *, owns_db: bool = False) -> None:
        # Not the embedded __init__: there is no SQLite file to open.
        self.db = db
        self.owns_db = owns_db  # opened for this source alone: closed with it
        self.description = f"database {db.url}"
        self.conn = db._connect()  # type: ignore[assignment]
        self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        self._picked = None

    def close(self) -> None:
        self.conn.close()
        if self.owns_db:
            self.db.close()


class PostgresTarget(EmbeddedTarget):
    """The embedded target's batching and verification, on PostgreSQL."""

    catalog_errors = (psycopg.Error,)

    def __init__(self, db: PostgresDatabase, *, owns_db: bool = False) -> None:
        super().__init__(db, owns_db=owns_db)
        self.description = f"database {db.url}"
        self.pgdb = db
        self._lock = threading.Lock()

    def _lookup_threadsafe(self, sop_uid: str) -> str | None:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.pgdb._connect()
            with self._lock:
                self._readers.append(conn)  # type: ignore[arg-type]
        row = conn.execute("SELECT sha256 FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()
        return row[0] if row else None
