"""DICOM files in folders, as a source (``import-dicom``).

Files are recognised by content, not by name. Headers are parsed in worker
processes (pydicom is pure Python, so threads would not help); the bytes are
read again, streaming, only by the target that stores them.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone

import msgspec

from dicomvault.dicom.probe import Header, NotInstance, read_header
from dicomvault.engine import (
    AttachmentRecord,
    Attributes,
    Item,
    Kind,
    Opener,
    Rejected,
    Selection,
    hookimpl,
)

PARALLEL_FROM = 64  # below this, starting worker processes costs more than it saves


def walk(paths: Sequence[str]) -> Iterator[str]:
    """Every file under the given paths, in a stable order; directory
    symlinks are not followed (no loops)."""
    for top in paths:
        if os.path.isfile(top):
            yield top
            continue
        if not os.path.isdir(top):
            yield top  # the probe reports it as unreadable
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                yield os.path.join(dirpath, name)


def _probe(path: str) -> Header | tuple[str, bool]:
    try:
        return read_header(path)
    except NotInstance as exc:
        return exc.reason, exc.ignored


class FolderSource:
    def __init__(self, paths: Sequence[str], *, jobs: int | None = None) -> None:
        self.paths = list(paths)
        self.jobs = jobs or os.cpu_count() or 1
        self.description = "files " + ", ".join(self.paths)

    def files(self) -> list[str]:
        return list(walk(self.paths))

    def instances(self, selection: Selection) -> Iterator[Item | Rejected]:
        files = self.files()
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if self.jobs > 1 and len(files) >= PARALLEL_FROM:
            with ProcessPoolExecutor(self.jobs) as pool:
                yield from self._items(files, pool.map(_probe, files, chunksize=32), now, selection)
        else:
            yield from self._items(files, map(_probe, files), now, selection)

    def _items(self, files: list[str], results: Iterator[Header | tuple[str, bool]], now: str,
               selection: Selection) -> Iterator[Item | Rejected]:
        for path, res in zip(files, results):
            if isinstance(res, tuple):
                yield Rejected(path, res[0], ignored=res[1])
                continue
            if not selection.matches(res.patient, res.study, res.series):
                continue
            rec = msgspec.structs.replace(res.instance, imported_at=now,
                                          origin="file:" + os.path.abspath(path))
            yield Item(rec, res.series, res.study, res.patient, _opener(path))

    def attributes(self, selection: Selection) -> Iterator[Attributes]:
        return iter(())

    def attachments(self, selection: Selection) -> Iterator[tuple[AttachmentRecord, Opener]]:
        return iter(())

    def close(self) -> None:
        pass


def _opener(path: str) -> Opener:
    return lambda: open(path, "rb")


def _is_folder(url: str) -> bool:
    return url.startswith("files:")


@hookimpl
def dicomvault_register_sources() -> list[Kind]:
    return [Kind(name="files", description="DICOM files and folders, searched recursively "
                 "(files:PATH[,PATH...])", matches=_is_folder,
                 open=lambda url, ctx: FolderSource(url[len("files:"):].split(",")))]

