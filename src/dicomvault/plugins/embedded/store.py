"""The content store: every file kept byte for byte, named by its SHA-256
(``store/<first two hex digits>/<sha256>``).

Names come from content only, never from UIDs or input paths. A file enters
the store through a private temporary file that is hashed while it is
written, then renamed into place, so the store never holds a partial
file under a final name; a batch is made durable before the catalog
commit that refers to it.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from dicomvault.engine import stream_views, writer_tag

from .collect import stale_staged

CHUNK = 1 << 20
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class Staged:
    """A file written to the store's temporary area, not yet published."""

    def __init__(self, path: str, sha256: str, size: int) -> None:
        self.path, self.sha256, self.size = path, sha256, size

    def discard(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class ContentStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = root / "store"
        self.tmp = root / "tmp"
        for d in (self.files, self.tmp):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._made: set[str] = set()  # fan-out folders known to exist
        # Store paths are built as strings: pathlib costs more than the rename itself, and
        # every stored file is named once per restore, in the run loop's thread.
        self._files = os.fspath(self.files)
        # in.HOST.PID.STORE-N: whoever collects leftovers can tell whether the writer still runs,
        # and this store can find its own (STORE tells two stores of one process apart)
        self._own = f"in.{writer_tag()}.{secrets.token_hex(4)}-"
        self._tmp_prefix = f"{self.tmp}{os.sep}{self._own}"
        self._counter = itertools.count()  # next() is atomic under the GIL: safe across threads

    def dir_of(self, sha256: str) -> str:
        return f"{self._files}{os.sep}{sha256[:2]}"  # 256 folders: few mkdirs, small enough dirs

    def path_of(self, sha256: str) -> str:
        return f"{self._files}{os.sep}{sha256[:2]}{os.sep}{sha256}"

    def exists(self, sha256: str) -> bool:
        return os.path.exists(self.path_of(sha256))

    def open(self, sha256: str) -> BinaryIO:
        return open(self.path_of(sha256), "rb")

    def _new_temp(self) -> tuple[int, str]:
        """A new private file in the temporary area. Names are unique per
        process (host, pid and a counter; O_EXCL guards against leftovers of
        an earlier process with the same pid): cheaper than mkstemp's random
        names, which cost more than the write of a small file."""
        while True:
            path = f"{self._tmp_prefix}{next(self._counter)}"
            try:
                return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o600), path
            except FileExistsError:
                continue

    def drop_staged(self, *, own: bool = True) -> int:
        """Remove the staged files of writers that are gone (see :mod:`.collect`)
        and, with ``own``, this store's own (only when none is still wanted: a
        run that ended, however it ended). Returns how many were removed."""
        found = stale_staged(self.tmp, self._own if own else "")
        for path, _size in found:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return len(found)

    def stage(self, stream: BinaryIO) -> Staged:
        """Copy a stream into a private temporary file, hashing as it goes.

        Not fsynced here: :meth:`make_durable` flushes a whole batch at once,
        before the catalog refers to it (one wait instead of one per file).
        Safe to call from several threads.
        """
        fd, path = self._new_temp()
        digest = hashlib.sha256()
        size = 0
        try:
            try:
                # Buffers the source offers without copying (a .bkp's decoded frames), else chunks
                # read from the stream: hashed and written as they are.
                views = stream_views(stream)
                for chunk in views if views is not None else iter(lambda: stream.read(CHUNK), b""):
                    digest.update(chunk)
                    _write_all(fd, chunk)
                    size += len(chunk)
            finally:
                os.close(fd)
        except BaseException:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            raise
        return Staged(path, digest.hexdigest(), size)

    def publish(self, staged: Staged) -> bool:
        """Move a staged file to its final name (:meth:`path_of`); returns
        whether it was newly added (False: the same bytes were there)."""
        final = self.path_of(staged.sha256)
        if os.path.exists(final):
            staged.discard()
            return False
        folder = self.dir_of(staged.sha256)
        if folder not in self._made:
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder, 0o700)
            self._made.add(folder)
        os.replace(staged.path, final)
        return True

    def remove(self, sha256: str) -> None:
        try:
            os.unlink(self.path_of(sha256))
        except FileNotFoundError:
            pass

    def make_durable(self, hashes: list[str], dirs: set[str]) -> None:
        """Make published files (by their SHA-256) and their directory entries
        durable.

        On Linux one ``syncfs`` covers the whole batch; elsewhere each file
        and directory is fsynced.
        """
        if not hashes and not dirs:
            return
        if _syncfs is not None:
            fd = os.open(self.files, os.O_RDONLY)
            try:
                if _syncfs(fd) == 0:
                    return
            finally:
                os.close(fd)
        for path in [*map(self.path_of, hashes), *dirs]:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:  # a regular file takes it all at once, but write(2) may write less
        view = view[os.write(fd, view):]


def _load_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syncfs  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_syncfs = _load_syncfs()
