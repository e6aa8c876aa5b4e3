"""Fuzz ``bkp validate``/``verify`` and ``bkp salvage`` with mutated golden
files: validation never raises (everything is a finding), salvage raises
only the format's own errors, and what salvage writes is always a valid
.bkp whose instances are byte-identical to the originals. The encrypted
golden file is fuzzed too: it reads back exactly as sealed, or fails with
the format's errors."""
from __future__ import annotations

import hashlib
import json
import resource
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicomvault.engine import FormatError, PassphraseError
from dicomvault.formats.bkp.layout import FRAME, pack_frame_header, unpack_frame_header, xxh3
from dicomvault.formats.bkp.reader import BkpReader
from dicomvault.formats.bkp.salvage import salvage
from dicomvault.formats.bkp.validate import validate, verify

V1 = Path(__file__).resolve().parent / "golden" / "bkp" / "v1"
SOURCES = ["basic.bkp", "newer-minor.bkp", "empty.bkp", "paged.bkp"]
ORIGINAL: dict[str, str] = {}
for _name in ("basic.bkp", "paged.bkp"):
    _r = BkpReader(V1 / _name)
    ORIGINAL.update({e.record.sop_uid: e.record.sha256 for e in _r.iter_instances()})
    _r.close()


class Mutant(bytes):
    def __repr__(self) -> str:  # short: hypothesis prints failing examples
        return f"Mutant({len(self)} bytes, sha256 {hashlib.sha256(self).hexdigest()[:16]})"


def _damage(draw: st.DrawFn, data: bytearray, kind: str) -> None:
    """One mutation of ``kind`` at a drawn position of ``data`` (not empty)."""
    at = draw(st.integers(0, len(data) - 1))
    if kind == "flip":
        data[at] ^= 1 << draw(st.integers(0, 7))
    elif kind == "overwrite":
        chunk = draw(st.binary(min_size=1, max_size=16))
        data[at:at + len(chunk)] = chunk
    elif kind == "huge":  # a length or offset field set to something absurd
        data[at:at + 8] = draw(st.sampled_from([b"\xff" * 8, (1 << 62).to_bytes(8, "little"),
                                                (1 << 40).to_bytes(8, "little")]))
    elif kind == "truncate":
        del data[at:]
    else:
        del data[at:at + draw(st.integers(1, 4096))]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray((V1 / draw(st.sampled_from(SOURCES))).read_bytes())
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "overwrite", "huge", "truncate", "cut-middle"]))
        if not data:
            break
        _damage(draw, data, kind)
    return Mutant(data)


@pytest.fixture(autouse=True)
def _bounded_memory():  # type: ignore[no-untyped-def]
    """An allocation sized from an unchecked length field fails the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (min(hard, 6 << 30) if hard > 0 else 6 << 30, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@settings(max_examples=150, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=mutated())
def test_validate_and_verify_never_raise(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "m.bkp"
    path.write_bytes(data)
    for result in (validate(path), verify(path)):
        assert result.valid == (not any(f.severity == "error" for f in result.findings))
        if result.valid and result.check == "verify":  # whatever verify calls valid really reads
            reader = BkpReader(path)
            try:
                for e in reader.iter_instances():
                    with reader.open_blob(e.blob) as fh:
                        assert hashlib.sha256(fh.read()).hexdigest() == e.record.sha256
            finally:
                reader.close()


@settings(max_examples=100, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=mutated())
def test_salvage_recovers_only_true_copies(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    work = tmp_path_factory.mktemp("salvage")
    src, out = work / "m.bkp", work / "out.bkp"
    src.write_bytes(data)
    try:
        result = salvage(src, out)
    except FormatError:
        assert not out.exists()
        return
    if not (result.instances_recovered or result.attachments_recovered):
        assert not out.exists() and not result.output  # nothing kept: no empty look-alike backup
        return
    assert verify(out).valid
    reader = BkpReader(out)
    try:
        rescued = {e.record.sop_uid: e.record.sha256 for e in reader.iter_instances()}
    finally:
        reader.close()
    assert result.instances_recovered == len(rescued)
    for uid, sha in rescued.items():
        assert ORIGINAL.get(uid) == sha, f"instance {uid} recovered with other bytes"
    assert not list(work.glob(".salvage.*")), "no spool file left behind"


# ------------------------------------------------------------------ encrypted
ENCRYPTED = V1 / "encrypted.bkp"
PASSPHRASE = json.loads((V1 / "encrypted.expected.json").read_text(encoding="utf-8"))["passphrase"]
_r = BkpReader(ENCRYPTED, passphrase=PASSPHRASE)
SEALED = {e.record.sop_uid: e.record.sha256 for e in _r.iter_instances()}
SEALED_FRAMES = [fe.offset for fe in _r.manifest.frames]
_r.close()


@st.composite
def mutated_encrypted(draw: st.DrawFn) -> bytes:
    """The encrypted golden file with flips, overwrites and cuts, some of them
    in frame payloads with the frame's checksum made valid again (only the
    authentication of AES-GCM can then catch them)."""
    data = bytearray(ENCRYPTED.read_bytes())
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "sealed-flip"]))
        if not data:
            break
        if kind == "sealed-flip" and SEALED_FRAMES:
            off = draw(st.sampled_from(SEALED_FRAMES))
            if off + FRAME.size > len(data):
                continue
            head = bytes(data[off:off + FRAME.size])
            ftype, codec, seq, stored, raw, _check = unpack_frame_header(head, off)
            if not stored or off + FRAME.size + stored > len(data):
                continue
            data[off + FRAME.size + draw(st.integers(0, stored - 1))] ^= 1 << draw(st.integers(0, 7))
            payload = bytes(data[off + FRAME.size:off + FRAME.size + stored])
            data[off:off + FRAME.size] = pack_frame_header(ftype, codec, seq, stored, raw, xxh3(payload))
        else:
            _damage(draw, data, kind)
    return Mutant(data)


@settings(max_examples=120, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=mutated_encrypted())
def test_an_encrypted_file_reads_as_written_or_fails_with_the_formats_errors(
        tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    """Whatever is done to an encrypted file, reading it either gives back
    exactly the instances that were sealed (AES-GCM authenticates every
    frame) or raises the format's own errors (or says the passphrase does
    not open it); validate and verify never raise."""
    path = tmp_path_factory.mktemp("fuzz-enc") / "m.bkp"
    path.write_bytes(data)
    for result in (validate(path, passphrase=PASSPHRASE), verify(path, passphrase=PASSPHRASE)):
        assert result.valid == (not any(f.severity == "error" for f in result.findings))
    try:
        reader = BkpReader(path, passphrase=PASSPHRASE)
    except (FormatError, PassphraseError):
        return
    try:
        for e in reader.iter_instances():
            with reader.open_blob(e.blob) as fh:
                content = fh.read()
            assert SEALED.get(e.record.sop_uid) == e.record.sha256 == hashlib.sha256(content).hexdigest()
    except (FormatError, PassphraseError):
        pass
    finally:
        reader.close()
