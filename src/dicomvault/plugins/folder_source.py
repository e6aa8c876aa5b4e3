"""DICOM files in folders, as a source (``import-dicom``).

Files are recognised by content, not by name. Headers are parsed in worker
processes (pydicom is pure Python, so threads would not help); the bytes are
read again, streaming, only by the target that stores them.
"""
from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import msgspec

from dicomvault.engine import (
    AttachmentRecord,
    Attributes,
    FileOpener,
    Item,
    Kind,
    Opener,
    Rejected,
    Selection,
    hookimpl,
)

BATCH = 64  # files per work item for the header-parsing processes
if TYPE_CHECKING:  # the probe imports pydicom: loaded when files are read, not at start-up
    from concurrent.futures import Future

    from dicomvault.dicom.probe import Header

    Probed = Header | tuple[str, bool]


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


def _batches(paths: Iterator[str], size: int) -> Iterator[list[str]]:
    while batch := list(itertools.islice(paths, size)):
        yield batch


def _probe(path: str) -> Probed:
    from dicomvault.dicom.probe import NotInstance, read_header

    try:
        return read_header(path)
    except NotInstance as exc:
        return exc.reason, exc.ignored


def _probe_many(paths: list[str]) -> list[Probed]:
    return [_probe(p) for p in paths]


class FolderSource:
    def __init__(self, paths: Sequence[str], *, jobs: int | None = None) -> None:
        self.paths = list(paths)
        self.jobs = jobs or os.cpu_count() or 1
        self.description = "files " + ", ".join(self.paths)

    def instances(self, selection: Selection) -> Iterator[Item | Rejected]:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        batches = _batches(walk(self.paths), BATCH)
        first = next(batches, [])
        if self.jobs <= 1 or len(first) < BATCH:  # small job: worker start-up costs more than it saves
            for batch in itertools.chain([first], batches):
                yield from self._items(batch, map(_probe, batch), now, selection)
            return
        # Imported here: multiprocessing costs every other command tens of milliseconds at start.
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(self.jobs) as pool:
            # A bounded window of batches in flight: memory stays flat however
            # many files there are, and the workers never wait for the walk.
            window: collections.deque[tuple[list[str], Future[list[Probed]]]] = collections.deque()
            for batch in itertools.chain([first], batches):
                window.append((batch, pool.submit(_probe_many, batch)))
                if len(window) > 2 * self.jobs:
                    done, future = window.popleft()
                    yield from self._items(done, future.result(), now, selection)
            while window:
                done, future = window.popleft()
                yield from self._items(done, future.result(), now, selection)

    def _items(self, files: list[str], results: Iterable[Probed], now: str,
               selection: Selection) -> Iterator[Item | Rejected]:
        for path, res in zip(files, results, strict=True):
            if isinstance(res, tuple):
                yield Rejected(path, res[0], ignored=res[1])
                continue
            if not selection.matches(res.patient, res.study, res.series):
                continue
            rec = msgspec.structs.replace(res.instance, imported_at=now,
                                          origin="file:" + os.path.abspath(path))
            yield Item(rec, res.series, res.study, res.patient, _opener(path), where=f"file {path}")

    def attributes(self, selection: Selection) -> Iterator[Attributes]:
        return iter(())

    def attachments(self, selection: Selection) -> Iterator[tuple[AttachmentRecord, Opener]]:
        return iter(())

    def close(self) -> None:
        pass


def _opener(path: str) -> Opener:
    return FileOpener(path)


def _is_folder(url: str) -> bool:
    return url.startswith("files:")


@hookimpl
def dicomvault_register_sources() -> list[Kind]:
    return [Kind(name="files", description="DICOM files and folders, searched recursively "
                 "(files:PATH[,PATH...])", matches=_is_folder,
                 open=lambda url, ctx: FolderSource(url[len("files:"):].split(",")))]
