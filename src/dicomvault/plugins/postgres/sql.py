"""A psycopg connection that speaks the embedded catalog's SQL.

The embedded database's code is written for SQLite. Its statements are
plain SQL except for a few spellings, translated here so that the
PostgreSQL database shares all of that code instead of copying it:

* ``?`` placeholders become ``%s``;
* ``BEGIN IMMEDIATE`` (SQLite: take the write lock now) becomes ``BEGIN``
  plus a transaction-scoped advisory lock, so writers from every client
  take turns exactly as SQLite writers do; readers never wait;
* ``INSERT OR REPLACE`` becomes ``INSERT ... ON CONFLICT DO UPDATE``;
* inserts into the hierarchy tables return the new row id
  (``cursor.lastrowid``).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import psycopg

WRITE_LOCK = 0x64_76_6C_74  # "dvlt": one lock per database, held by the writing transaction

_UPSERT_KEYS = {"attributes": ("level", "uid"), "attachments": ("attachment_id",)}
_INSERT_OR_REPLACE = re.compile(r"^\s*INSERT OR REPLACE INTO (\w+) \(([^)]*)\)(.*)$", re.S)
_RETURNS_ID = re.compile(r"^\s*INSERT INTO (patients|studies|series) ", re.S)


def translate(sql: str) -> str:
    sql = sql.replace("?", "%s")
    m = _INSERT_OR_REPLACE.match(sql)
    if m:
        table, cols, rest = m.groups()
        keys = _UPSERT_KEYS[table]
        names = [c.strip() for c in cols.split(",")]
        sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in names if c not in keys)
        sql = f"INSERT INTO {table} ({cols}){rest} ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sets}"
    elif _RETURNS_ID.match(sql):
        sql += " RETURNING id"
    return sql


class Cursor:
    def __init__(self, cur: psycopg.Cursor[Any]) -> None:
        self.cur = cur

    @property
    def lastrowid(self) -> int:
        row = self.cur.fetchone()
        assert row is not None
        return int(row[0])

    @property
    def rowcount(self) -> int:
        return self.cur.rowcount

    def fetchone(self) -> Any:
        return self.cur.fetchone()

    def fetchall(self) -> list[Any]:
        return self.cur.fetchall()

    def __iter__(self) -> Iterator[Any]:
        return iter(self.cur)


class Connection:
    """The subset of ``sqlite3.Connection`` the embedded code uses."""

    def __init__(self, conninfo: str) -> None:
        self.pg = psycopg.connect(conninfo, autocommit=True)  # transactions are explicit, as in SQLite

    def execute(self, sql: str, params: Iterable[object] = ()) -> Cursor:
        stmt = sql.strip().upper()
        if stmt == "BEGIN IMMEDIATE":
            self.pg.execute("BEGIN")
            return Cursor(self.pg.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,)))
        return Cursor(self.pg.execute(translate(sql), tuple(params)))  # type: ignore[arg-type]

    def executemany(self, sql: str, rows: Iterable[Iterable[object]]) -> None:
        with self.pg.cursor() as cur:
            cur.executemany(translate(sql), [tuple(r) for r in rows])  # type: ignore[arg-type]

    def close(self) -> None:
        self.pg.close()
