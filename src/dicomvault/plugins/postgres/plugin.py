"""Registers the PostgreSQL database as a database, a source and a target.

Address: ``postgresql://USER@HOST:PORT/DBNAME?store=DIR`` (see :mod:`.url`).
psycopg is imported only when such an address is opened (it costs ~0.1 s
of start-up to every command otherwise).
"""
from __future__ import annotations

from dicomvault.engine import Context, Kind, hookimpl

from .url import is_postgres

_WHAT = "PostgreSQL catalog + shared content store (postgresql://USER@HOST:PORT/DB?store=DIR)"


def _open_db(url: str, ctx: Context) -> object:
    from .database import PostgresDatabase

    return PostgresDatabase(url)


def _open_source(url: str, ctx: Context) -> object:
    from .database import PostgresDatabase, PostgresSource

    return PostgresSource(PostgresDatabase(url), owns_db=True)


def _open_target(url: str, ctx: Context) -> object:
    from .database import PostgresDatabase, PostgresTarget

    return PostgresTarget(PostgresDatabase(url), owns_db=True)


@hookimpl
def dicomvault_register_databases() -> list[Kind]:
    return [Kind(name="postgresql", description=_WHAT, matches=is_postgres, open=_open_db)]


@hookimpl
def dicomvault_register_sources() -> list[Kind]:
    return [Kind(name="postgresql", description=_WHAT, matches=is_postgres, open=_open_source)]


@hookimpl
def dicomvault_register_targets() -> list[Kind]:
    return [Kind(name="postgresql", description=_WHAT, matches=is_postgres, open=_open_target)]
