"""The content store: every file kept byte for byte, named by its SHA-256.

Names come from content only, never from UIDs or input paths. A file enters
the store through a private temporary file that is hashed while it is
written, fsynced, then renamed into place, so the store never holds a
partial file under a final name.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20


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

    def path_of(self, sha256: str) -> Path:
        return self.files / sha256[:2] / sha256[2:4] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path_of(sha256).exists()

    def open(self, sha256: str) -> BinaryIO:
        return open(self.path_of(sha256), "rb")

    def stage(self, stream: BinaryIO) -> Staged:
        """Copy a stream into a private temporary file, hashing as it goes."""
        fd, path = tempfile.mkstemp(dir=self.tmp, prefix="in-")  # mode 0600
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            raise
        return Staged(path, digest.hexdigest(), size)

    def publish(self, staged: Staged) -> tuple[Path, bool]:
        """Move a staged file to its final name; returns (path, newly added)."""
        final = self.path_of(staged.sha256)
        if final.exists():
            staged.discard()
            return final, False
        final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.replace(staged.path, final)
        return final, True

    def remove(self, sha256: str) -> None:
        try:
            self.path_of(sha256).unlink()
        except FileNotFoundError:
            pass

    @staticmethod
    def sync_dirs(paths: set[Path]) -> None:
        """fsync directories so that renames into them survive a crash."""
        for d in paths:
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
