"""Collecting what interrupted writers left in a database's file store:
staged copies of processes that are gone, and store files that no catalog row
names (published by a writer killed before its commit).

Both are harmless (never read, never named) but take space. Store files are
judged under the write lock: every writer holds it from publishing a file to
committing the row that names it, so a file nothing names then will never be
named. Staged files are written before the lock is taken, so they are judged
by their name, which holds the host and process that wrote them
(``in.HOST.PID.STORE-N``, see :class:`~.store.ContentStore`): only a process of this
host that no longer runs is known to be gone; other staged files go once they
are a day old.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import msgspec

from dicomvault.engine import writer_is_gone

STALE_AFTER = 24 * 3600  # staged files whose writer cannot be asked: gone after this long


class Collected(msgspec.Struct, kw_only=True):
    """What was removed (or, in a dry run, would be)."""

    store_files: int = 0
    store_bytes: int = 0
    staged_files: int = 0
    staged_bytes: int = 0
    dry_run: bool = False


def staged_file_is_stale(name: str, mtime: float, *, now: float | None = None) -> bool:
    """Whether a file in the staging area belongs to no running writer."""
    if not name.startswith("in"):
        return False  # not ours: left alone
    tag = name[3:].rpartition(".")[0] if name.startswith("in.") else ""
    if tag.rpartition(".")[0] == socket.gethostname():
        return writer_is_gone(tag)
    return (now or time.time()) - mtime > STALE_AFTER


def stale_staged(staging: Path, own_prefix: str = "") -> list[tuple[str, int]]:
    """(path, size) of the staged files that belong to no running writer, and
    of those whose name starts with ``own_prefix`` (a writer's own, when it
    knows it wants none of them any more)."""
    found: list[tuple[str, int]] = []
    try:
        entries = list(os.scandir(staging))
    except FileNotFoundError:
        return found
    for entry in entries:
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # another writer's copy, published (renamed away) since the listing
        mine = bool(own_prefix) and entry.name.startswith(own_prefix)
        if mine or staged_file_is_stale(entry.name, st.st_mtime):
            found.append((entry.path, st.st_size))
    return found


def collect(write_lock: AbstractContextManager[Any], store_root: Path, staging: Path, *,
            dry_run: bool = False) -> Collected:
    """Remove (or count, with ``dry_run``) unreferenced store files and stale
    staged files. ``write_lock`` is the database's write transaction; it
    gives the catalog connection."""
    out = Collected(dry_run=dry_run)
    with write_lock as locked:
        named = {row[0] for row in locked.execute("SELECT sha256 FROM instances")}
        named.update(row[0] for row in locked.execute("SELECT sha256 FROM attachments"))
        for fan in sorted(os.scandir(store_root), key=lambda e: e.name):
            if not fan.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(fan.path):
                if entry.name in named or not entry.is_file(follow_symlinks=False):
                    continue
                out.store_files += 1
                out.store_bytes += entry.stat(follow_symlinks=False).st_size
                if not dry_run:
                    _unlink(entry.path)
    for path, size in stale_staged(staging):
        out.staged_files += 1
        out.staged_bytes += size
        if not dry_run:
            _unlink(path)
    return out


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
