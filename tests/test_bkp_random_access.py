"""Selective random access: listing reads only the header, the footer and
the manifest; restoring a selection reads only the frames that hold it.

Bytes are counted where they leave the file: every positioned read the
reader makes on the .bkp's file descriptor (``os.pread``/``os.preadv`` as
seen by the reader module), with its offset, so the test knows not only
how much was read but which frames.
"""
from __future__ import annotations

import builtins
import io
import os
import random
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bkp_synth import Builder, hierarchy, uid
from dicomvault.formats.bkp import reader as reader_module
from dicomvault.formats.bkp.layout import FOOTER, FRAME, HEADER, unpack_footer
from dicomvault.formats.bkp.reader import BkpReader


@dataclass
class Reads:
    """Reads from one file (by inode), as (offset, bytes returned)."""

    inode: int
    log: list[tuple[int, int]] = field(default_factory=list)
    frames_bytes_read: list[int] = field(default_factory=list)  # BkpReader.bytes_read at close

    @property
    def total(self) -> int:
        return sum(n for _off, n in self.log)


@pytest.fixture
def count_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    def install(path: Path) -> Reads:
        reads = Reads(path.stat().st_ino)

        def ours(fd: int) -> bool:
            return os.fstat(fd).st_ino == reads.inode

        def pread(fd: int, n: int, offset: int) -> bytes:
            data = os.pread(fd, n, offset)
            if ours(fd):
                reads.log.append((offset, len(data)))
            return data

        def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
            got = os.preadv(fd, buffers, offset)
            if ours(fd):
                reads.log.append((offset, got))
            return got

        class CountingFile(io.FileIO):
            """Reads through a file object count too (none expected: the
            reader makes positioned reads only)."""

            def readinto(self, buffer: Any) -> int | None:
                offset = self.tell()
                n = super().readinto(buffer)
                reads.log.append((offset, n or 0))
                return n

        def counting_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if mode == "rb" and os.stat(file).st_ino == reads.inode:
                return io.BufferedReader(CountingFile(file, "rb"))
            return builtins.open(file, mode, *args, **kwargs)

        monkeypatch.setattr(reader_module, "open", counting_open, raising=False)
        fake = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
        fake.pread, fake.preadv = pread, preadv
        monkeypatch.setattr(reader_module, "os", fake)
        original_close = BkpReader.close

        def close(self: BkpReader) -> None:
            reads.frames_bytes_read.append(self.bytes_read)
            original_close(self)

        monkeypatch.setattr(BkpReader, "close", close)
        return reads

    yield install


@dataclass(frozen=True)
class MultiSeries:
    path: Path
    series: list[str]


@pytest.fixture(scope="module")
def multi_series(tmp_path_factory: pytest.TempPathFactory) -> MultiSeries:
    """6 series of 12 instances of 150 to 450 kB (random: frames are stored
    raw), ~22 MB in 4 MiB frames: each series spans one to three frames."""
    rng = random.Random(11)
    path = tmp_path_factory.mktemp("random-access") / "multi.bkp"
    b = Builder(path)
    b.patients, b.studies, b.series = hierarchy(2, 1, 3)
    for s, se in enumerate(b.series):
        for i in range(12):
            b.instance(uid(3, s, i), se.series_uid, rng.randbytes(rng.randrange(150_000, 450_000)), i + 1)
    b.finish()
    return MultiSeries(path, [se.series_uid for se in b.series])


def _layout(path: Path) -> tuple[int, int, int, list[tuple[int, int, int, int]]]:
    """(file size, manifest offset, manifest length, [(offset, stored, stream_offset, raw)])."""
    data = path.read_bytes()
    moff, mlen, _n, _id = unpack_footer(data[-FOOTER.size:])
    r = BkpReader(path)
    try:
        frames = [(fe.offset, fe.stored, fe.stream_offset, fe.raw) for fe in r.manifest.frames]
    finally:
        r.close()
    return len(data), moff, mlen, frames


def test_listing_reads_only_header_footer_and_manifest(multi_series: MultiSeries, count_reads) -> None:
    size, moff, mlen, frames = _layout(multi_series.path)
    reads: Reads = count_reads(multi_series.path)
    r = BkpReader(multi_series.path)
    try:
        assert len(r.manifest.instances) == 72 and len(frames) >= 5
    finally:
        r.close()
    assert sorted(reads.log) == sorted([(0, HEADER.size), (size - FOOTER.size, FOOTER.size),
                                        (moff, FRAME.size), (moff + FRAME.size, mlen - FRAME.size)])
    assert reads.total == HEADER.size + FOOTER.size + mlen
    assert reads.frames_bytes_read == [0]


def test_dry_run_import_reads_no_frame(cli, multi_series: MultiSeries, count_reads, tmp_path: Path) -> None:
    """``import-db --dry-run`` of the whole file: a listing, through the CLI."""
    _size, _moff, mlen, _frames = _layout(multi_series.path)
    reads: Reads = count_reads(multi_series.path)
    res = cli("--db", tmp_path / "db", "import-db", multi_series.path, "--dry-run", "--json")
    assert res.code == 0, res.err
    assert reads.total == HEADER.size + FOOTER.size + mlen
    assert reads.frames_bytes_read == [0]


@pytest.mark.parametrize("which", [0, 2, 5])
def test_restoring_one_series_reads_only_its_frames(cli, multi_series: MultiSeries, count_reads,
                                                    tmp_path: Path, which: int) -> None:
    series_uid = multi_series.series[which]
    size, _moff, mlen, frames = _layout(multi_series.path)
    r = BkpReader(multi_series.path)
    try:
        blobs = [(e.blob.offset, e.blob.length) for e in r.manifest.instances
                 if e.record.series_uid == series_uid]
    finally:
        r.close()
    # the frames whose content overlaps one of the series' blobs
    needed = {(off, stored) for off, stored, start, raw in frames
              if any(o < start + raw and start < o + n for o, n in blobs)}
    assert 0 < len(needed) < len(frames)

    reads: Reads = count_reads(multi_series.path)
    res = cli("--db", tmp_path / "db", "import-db", multi_series.path, "--series", series_uid, "--json")
    assert res.code == 0, res.err
    assert res.json()["counts"]["instance"] == {"stored": 12}

    frame_bytes = sum(FRAME.size + stored for _off, stored in needed)
    # every needed frame read exactly once (header, then payload), nothing else but the listing
    frame_reads = sorted((off, n) for off, n in reads.log if HEADER.size <= off < size - FOOTER.size - mlen)
    assert frame_reads == sorted([(off, FRAME.size) for off, _ in needed]
                                 + [(off + FRAME.size, stored) for off, stored in needed])
    assert reads.total == HEADER.size + FOOTER.size + mlen + frame_bytes
    assert reads.frames_bytes_read == [frame_bytes]
    assert reads.total < size // 2


def test_full_restore_reads_every_frame_once(cli, count_reads, tmp_path: Path) -> None:
    """A whole restore with several workers and many frames: each frame is
    read (and decoded) once, however the workers and the read-ahead race.
    A cache that drops frames decoded ahead before their readers get there
    makes them read again; this counts it."""
    rng = random.Random(5)
    path = tmp_path / "many-frames.bkp"
    b = Builder(path, frame_size=64 << 10)
    b.patients, b.studies, b.series = hierarchy(1, 2, 2)
    n = 0
    for se in b.series:
        for i in range(150):
            b.instance(uid(4, n, i), se.series_uid, rng.randbytes(rng.randrange(4_000, 40_000)), i + 1)
        n += 1
    b.finish()
    size, _moff, mlen, frames = _layout(path)
    assert len(frames) > 4 * 16  # far more frames than the reader caches

    reads: Reads = count_reads(path)
    res = cli("--db", tmp_path / "db", "import-db", path, "--json")
    assert res.code == 0, res.err
    assert res.json()["counts"]["instance"] == {"stored": 600}
    payload_reads = sorted(off for off, n in reads.log if HEADER.size <= off < size - FOOTER.size - mlen
                           and n != FRAME.size)
    assert payload_reads == sorted(off + FRAME.size for off, _stored, _start, _raw in frames)
