"""Blobs of a .bkp handed over without copies (``stream_views``): the
restore into the embedded database hashes and writes slices of the decoded
frames as they are. The bytes must be exactly the blob's, across frame
boundaries, and a stream that was read from must not offer them."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from bkp_synth import small_file
from dicomvault.engine import stream_views
from dicomvault.formats.bkp.reader import BkpReader


@pytest.fixture
def bkp(tmp_path: Path) -> Path:
    # frames of 512 bytes and blobs up to 1,500: most blobs span two to four frames
    return small_file(tmp_path / "views.bkp", seed=7, series=2, per_series=5)


def test_views_give_exactly_each_blob_across_frames(bkp: Path) -> None:
    reader = BkpReader(bkp)
    try:
        spanning = 0
        for e in reader.iter_instances():
            with reader.open_blob(e.blob) as fh:
                views = stream_views(fh)
                assert views is not None
                parts = [bytes(v) for v in views]
            data = b"".join(parts)
            assert len(data) == e.record.size and hashlib.sha256(data).hexdigest() == e.record.sha256
            assert all(parts) or not data  # no empty pieces
            spanning += len(parts) > 1
        assert spanning, "the test file must have blobs that span frames"
    finally:
        reader.close()


def test_a_stream_read_from_offers_no_views(bkp: Path) -> None:
    reader = BkpReader(bkp)
    try:
        e = max(reader.iter_instances(), key=lambda e: e.blob.length)
        with reader.open_blob(e.blob) as fh:
            fh.read(10)
            views = stream_views(fh)
            assert views is not None
            with pytest.raises(ValueError):
                next(views)
    finally:
        reader.close()


def test_other_streams_are_read_as_usual(tmp_path: Path) -> None:
    path = tmp_path / "plain.bin"
    path.write_bytes(b"x" * 100)
    with open(path, "rb") as fh:
        assert stream_views(fh) is None
    assert stream_views(io.BytesIO(b"abc")) is None
