"""No ceiling: file offsets just below and above 2**31 and 2**32, payload
stream offsets past 2**32, one instance larger than 4 GiB written and read
back as a stream with flat memory, a single frame larger than 2 GiB, and
more than 65,535 instances in one file.

Gigabytes are never written to disk: file offsets are pushed up by holes
(sparse files), and the big instance is generated content that zstd
squeezes to a few megabytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import xxhash

from bkp_synth import Builder, hierarchy, uid
from dicomvault.engine import InstanceRecord
from dicomvault.formats.bkp import layout
from dicomvault.formats.bkp.layout import (
    CODEC_NONE,
    FRAME_DATA,
    FRAME_MANIFEST,
    pack_footer,
    pack_frame_header,
    pack_header,
    xxh3,
)
from dicomvault.formats.bkp.manifest import Blob, FrameEntry, InstanceEntry, Manifest, encoder
from dicomvault.formats.bkp.reader import BkpReader
from dicomvault.formats.bkp.writer import BkpWriter

HERE = Path(__file__).resolve().parent


def _sparse_or_skip(path: Path) -> None:
    if path.stat().st_blocks * 512 > 256 << 20:
        pytest.skip("this file system does not keep sparse files sparse")


def _extract_all(reader: BkpReader) -> dict[str, str]:
    out = {}
    for e in reader.manifest.instances:
        digest = hashlib.sha256()
        with reader.open_blob(e.blob) as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        out[e.record.sop_uid] = digest.hexdigest()
    return out


# ---------------------------------------------------------------------- file offsets

class HoleWriter(BkpWriter):
    """The real writer, except that data frame ``seq`` starts at the absolute
    offset ``holes[seq]``: the file gets a hole before it (test only; the
    frame index records the real offsets, which is all a reader follows)."""

    holes: dict[int, int] = {}

    def _drain_one(self) -> None:
        target = self.holes.get(len(self.frames))
        if target is not None:
            assert target >= self.pos
            self.fh.flush()
            self.fh.seek(target)
            self.pos = target
        super()._drain_one()


FRAME = 1 << 16
def _edge_holes() -> dict[int, int]:
    """Frame seq -> absolute offset: frames whose header or payload crosses
    2**31 and 2**32, and frames just above them."""
    step = FRAME + 48 + 64  # room for one frame (raw or zstd) and a little more
    return {1: 2**31 - 48 - 10,  # header below 2**31, payload across it
            2: 2**31 + step,  # just above
            3: 2**32 - 20,  # the frame header itself across 2**32
            4: 2**32 + step,  # just above
            5: 2**32 + 2 * step + 1}  # odd offset; the manifest and footer follow, beyond 2**32


def test_frames_at_offsets_around_2_31_and_2_32(cli, tmp_path: Path) -> None:
    """Frames placed by holes across and just past 2**31 and 2**32; blobs
    span those frames. Open, list, extract every blob by its SHA-256, and
    restore through ``import-db``. (A file with holes is not contiguous, so a
    full verification of SPEC 10.3 would report the gaps: only opening,
    listing and extracting are checked here.)"""
    rng = random.Random(31)
    path = tmp_path / "edges.bkp"
    HoleWriter.holes = _edge_holes()
    b = Builder(path, frame_size=FRAME, threads=1, writer_cls=HoleWriter)
    b.patients, b.studies, b.series = hierarchy(1, 1, 2)
    sizes = [1000, FRAME - 1000, FRAME + 5, 3 * FRAME, 17, FRAME // 2, 2 * FRAME + 3]
    for i, size in enumerate(sizes):
        # random (stored raw, codec 0) and repetitive (zstd) content alternate
        data = rng.randbytes(size) if i % 2 else (b"pixel-%d " % i * size)[:size]
        b.instance(uid(3, i), b.series[i % 2].series_uid, data, number=i + 1)
    expected = {e.record.sop_uid: e.record.sha256 for e in b.instances}
    b.finish()
    _sparse_or_skip(path)

    reader = BkpReader(path)
    try:
        offsets = [fe.offset for fe in reader.manifest.frames]
        for seq, off in _edge_holes().items():
            assert offsets[seq] == off
        assert reader.size > 2**32 + 2 * (FRAME + 112)
        assert {fe.codec for fe in reader.manifest.frames} == {0, 1}
        assert _extract_all(reader) == expected
    finally:
        reader.close()

    db = tmp_path / "db"
    res = cli("--db", db, "import-db", path, "--json")
    assert res.code == 0, res.err
    assert res.json()["counts"]["instance"] == {"stored": len(sizes)}


@pytest.mark.slow
def test_a_frame_larger_than_2_gib(tmp_path: Path) -> None:
    """A single codec-0 frame of 2 GiB + 4 KiB (SPEC 5.5: the frame size is
    the writer's choice). One pread(2) returns at most 2 GiB - 4 KiB on
    Linux; the reader must read on rather than call the file truncated.
    The payload is a hole: zeros that take no disk space (but 2 GiB of RAM
    while the frame is decoded)."""
    size = 2**31 + 4096
    chunk = bytes(1 << 20)
    sha, check = hashlib.sha256(), xxhash.xxh3_64()
    left = size
    while left:
        piece = chunk[:min(left, len(chunk))]
        sha.update(piece)
        check.update(piece)
        left -= len(piece)
    record = InstanceRecord(sop_uid=uid(9, 1), series_uid=uid(2, 0, 0, 0), size=size, sha256=sha.hexdigest())
    ps, sts, ses = hierarchy(1, 1, 1)
    path = tmp_path / "bigframe.bkp"
    file_id = os.urandom(16)
    with open(path, "wb") as fh:
        fh.write(pack_header(file_id, time.time_ns()))
        fh.write(pack_frame_header(FRAME_DATA, CODEC_NONE, 0, size, size, check.intdigest()))
        fh.seek(64 + 48 + size)  # the payload: a hole of zeros
        moff = fh.tell()
        m = Manifest(major=layout.MAJOR, minor=layout.MINOR, writer="test", created="2024-01-01",
                     frames=[FrameEntry(64, size, size, CODEC_NONE, 0)], patients=ps, studies=sts,
                     series=ses, instances=[InstanceEntry(record, Blob(0, size))])
        raw = encoder.encode(m)
        frame = pack_frame_header(FRAME_MANIFEST, CODEC_NONE, 1, len(raw), len(raw), xxh3(raw)) + raw
        fh.write(frame)
        fh.write(pack_footer(moff, len(frame), 1, file_id))
    _sparse_or_skip(path)
    reader = BkpReader(path)
    try:
        assert _extract_all(reader) == {record.sop_uid: record.sha256}
    finally:
        reader.close()


# ---------------------------------------------------------------------- a 4 GiB+ instance

BIG_CHILD = textwrap.dedent('''
    import hashlib, io, json, os, sys, time
    sys.path.insert(0, sys.argv[1])
    from bkp_synth import Builder, Hashing, hierarchy, uid
    from dicomvault.formats.bkp.reader import BkpReader

    def peak_rss_kb():
        # VmHWM: the peak of this process's own memory. (getrusage's ru_maxrss
        # is not: it starts from the parent's peak when spawned by vfork.)
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))

    path, size = sys.argv[2], int(sys.argv[3])
    # "pixel data": a 4 KiB tile of noise repeated, after a DICOM-like preamble
    tile = bytes((i * 2654435761 >> 7) & 0xFF for i in range(4096))
    head = bytes(128) + b"DICM" + b"generated pixel data follows".ljust(380, b" ")
    t0 = time.monotonic()
    b = Builder(path)
    b.patients, b.studies, b.series = hierarchy(1, 1, 1)
    se = b.series[0].series_uid
    small1 = b.instance(uid(3, 1), se, os.urandom(1000))
    big = b.instance(uid(3, 2), se, io.BufferedReader(Hashing(size, head + tile * 1024)))
    small2 = b.instance(uid(3, 3), se, os.urandom(3000))  # after the big one: stream offset > 4 GiB
    b.finish()
    t1 = time.monotonic()
    rss_write = peak_rss_kb()

    r = BkpReader(path)
    got = {}
    for e in (small2, big, small1):
        blob = next(x.blob for x in r.manifest.instances if x.record.sop_uid == e.record.sop_uid)
        digest = hashlib.sha256()
        with r.open_blob(blob) as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        got[e.record.sop_uid] = digest.hexdigest() == e.record.sha256
    t2 = time.monotonic()
    print(json.dumps({
        "ok": got, "big_offset": big.blob.offset, "big_length": big.blob.length,
        "small2_offset": small2.blob.offset, "big_size": big.record.size,
        "stream": r.stream_size, "frames": len(r.manifest.frames), "file_bytes": os.path.getsize(path),
        "rss_write_kb": rss_write, "rss_kb": peak_rss_kb(),
        "write_s": round(t1 - t0, 1), "read_s": round(t2 - t1, 1)}))
    r.close()
''')


@pytest.mark.slow
def test_instance_larger_than_4_gib_streams_with_flat_memory(tmp_path: Path) -> None:
    """A 4 GiB + 12,345-byte instance between two small ones, written through
    the writer's streaming API and read back through ``open_blob`` in a child
    process: SHA-256 verified, the stream offset of the blob after it is past
    2**32, and the child's peak RSS (VmHWM) stays under 300 MB (the
    instance is never held in memory). On disk it takes a few megabytes (its content repeats)."""
    size = 2**32 + 12_345
    path = tmp_path / "big.bkp"
    proc = subprocess.run([sys.executable, "-c", BIG_CHILD, str(HERE), str(path), str(size)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout)
    assert all(info["ok"].values()), info
    assert info["big_length"] == info["big_size"] == size
    assert info["small2_offset"] == 1000 + size > 2**32
    assert info["stream"] == 1000 + size + 3000
    assert info["frames"] > 1024
    assert info["file_bytes"] < 64 << 20, info
    assert info["rss_kb"] < 300 * 1024, info
    print(f"4 GiB+ instance: {info}")


# ---------------------------------------------------------------------- > 65,535 instances

def test_more_than_65535_instances(cli, tmp_path: Path) -> None:
    """70,000 instances in one file, written the way the export target does
    it (a blob and a record each): the file opens and lists them all, the
    first, middle and last extract by SHA-256, and ``import-db --series``
    restores the series that holds the last ones."""
    n = 70_000
    path = tmp_path / "many.bkp"
    b = Builder(path)
    b.patients, b.studies, b.series = hierarchy(1, 1, 8)
    template = bytes(128) + b"DICM"
    for i in range(n):
        # seven big series, then the last one with only the last 10 instances
        series = b.series[min(i // 10_000, 6)] if i < n - 10 else b.series[7]
        b.instance(uid(4, i), series.series_uid, template + b"%08d" % i * 4, number=i + 1)
    b.finish()

    reader = BkpReader(path)
    try:
        entries = reader.manifest.instances
        assert len(entries) == n > 65_535
        assert len({e.record.sop_uid for e in entries}) == n
        for i in (0, n // 2, n - 1):
            e = entries[i]
            assert e.record.sop_uid == uid(4, i)
            with reader.open_blob(e.blob) as fh:
                data = fh.read()
            assert hashlib.sha256(data).hexdigest() == e.record.sha256
            assert data.endswith(b"%08d" % i)
    finally:
        reader.close()

    db = tmp_path / "db"
    res = cli("--db", db, "import-db", path, "--series", b.series[7].series_uid, "--json")
    assert res.code == 0, res.err
    assert res.json()["counts"]["instance"] == {"stored": 10}


def test_many_instances_stream_offsets_are_exact(tmp_path: Path) -> None:
    """Stream offsets of consecutive blobs tile the payload (no 32-bit
    wrap-around in the bookkeeping), checked against an independent sum."""
    path = tmp_path / "tiles.bkp"
    b = Builder(path, frame_size=1 << 12)
    b.patients, b.studies, b.series = hierarchy(1, 1, 1)
    offset = 0
    rng = random.Random(5)
    for i in range(500):
        data = rng.randbytes(rng.randrange(0, 9000))
        e = b.instance(uid(5, i), b.series[0].series_uid, io.BytesIO(data).read())
        assert e.blob == Blob(offset, len(data))
        offset += len(data)
    b.finish()
    reader = BkpReader(path)
    try:
        assert reader.stream_size == offset
        assert _extract_all(reader) == {e.record.sop_uid: e.record.sha256 for e in b.instances}
    finally:
        reader.close()


def test_large_zstd_frames_decode_piece_by_piece(tmp_path: Path) -> None:
    """Frames announcing more than the reader's one-shot limit (64 MiB) are
    decompressed piece by piece: a 96 MiB frame written by the real writer
    (another writer's frame size) reads back exactly."""
    from dicomvault.formats.bkp import reader as reader_module

    path = tmp_path / "bigframes.bkp"
    b = Builder(path, frame_size=96 << 20, threads=1)
    b.patients, b.studies, b.series = hierarchy(1, 1, 1)
    tile = random.Random(3).randbytes(4096)
    e = b.instance(uid(6, 1), b.series[0].series_uid, tile * (25 << 10) + b"end")  # 100 MiB + 3 bytes
    b.finish()
    reader = BkpReader(path)
    try:
        assert [fe.raw for fe in reader.manifest.frames] == [96 << 20, (4 << 20) + 3]
        assert reader.manifest.frames[0].codec == 1 and reader.manifest.frames[0].raw > reader_module.ONE_SHOT
        assert _extract_all(reader) == {e.record.sop_uid: e.record.sha256}
    finally:
        reader.close()
