"""Registers the embedded database as a database, a source and a target.

Addresses: a plain path, or ``sqlite:PATH``.
"""
from __future__ import annotations

import re
from pathlib import Path

from dicomvault.engine import Context, Kind, hookimpl

from .database import EmbeddedDatabase, EmbeddedTarget, NewDatabaseTarget


def _path(url: str) -> str:
    return url[len("sqlite:"):] if url.startswith("sqlite:") else url


def _is_embedded(url: str) -> bool:
    # Not "scheme:..." of some other kind (a missing plugin's address must not become a folder
    # named "myscheme:" here); a one-letter prefix is a Windows drive.
    return url.startswith("sqlite:") or ("://" not in url and not url.lower().endswith(".bkp")
                                         and not re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", url))


def _open_db(url: str, ctx: Context) -> EmbeddedDatabase:
    return EmbeddedDatabase(_path(url), create=ctx.create_database)


def _open_source(url: str, ctx: Context) -> object:
    return EmbeddedDatabase(_path(url), create=False).source()


def _open_target(url: str, ctx: Context) -> object:
    root = Path(_path(url)).expanduser()
    if not (root / "catalog.sqlite").exists():
        return NewDatabaseTarget(root)  # created by the first write, not by opening
    return EmbeddedTarget(EmbeddedDatabase(root, create=False), owns_db=True)


@hookimpl
def dicomvault_register_databases() -> list[Kind]:
    return [Kind(name="embedded", description="SQLite catalog + content store in a directory (PATH "
                 "or sqlite:PATH)", matches=_is_embedded, open=_open_db)]


@hookimpl
def dicomvault_register_sources() -> list[Kind]:
    return [Kind(name="embedded", description="an embedded database (PATH or sqlite:PATH)",
                 matches=_is_embedded, open=_open_source)]


@hookimpl
def dicomvault_register_targets() -> list[Kind]:
    return [Kind(name="embedded", description="an embedded database, created if missing (PATH or "
                 "sqlite:PATH)", matches=_is_embedded, open=_open_target)]
