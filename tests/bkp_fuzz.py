"""The fuzz run of ``test_bkp_fuzz.py``, in a child process under a cap on
its address space (``RLIMIT_AS``): an allocation sized from a crafted length
field fails there with MemoryError instead of quietly succeeding on a big
machine, and MemoryError is not one of the format's errors.

    python tests/bkp_fuzz.py LIMIT_MB GOLDEN.bkp [GOLDEN.bkp ...]

Each example takes a good file, applies one to four mutations (bit flips,
truncation, overwritten byte ranges, binary fields set to extreme values
with their checksums made valid again, payloads and manifests rewritten with
valid checksums, zstd frames that announce huge sizes) and hands the result
to every checker: the reader (open, then extract every blob) and, once it
exists, ``dicomvault.formats.bkp.validate.validate``. Only the format's own
errors may come out.
"""
from __future__ import annotations

import collections
import hashlib
import os
import resource
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import zstandard
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dicomvault.engine import FormatError
from dicomvault.formats.bkp.layout import (
    CODEC_NONE,
    CODEC_ZSTD,
    FOOTER,
    FRAME,
    FRAME_MANIFEST,
    HEADER,
    pack_footer,
    pack_frame_header,
    unpack_footer,
    unpack_frame_header,
    xxh3,
)
from dicomvault.formats.bkp.reader import BkpOpenError, BkpReader

ALLOWED: tuple[type[BaseException], ...] = (FormatError, BkpOpenError)
EXAMPLES = int(os.environ.get("DICOMVAULT_FUZZ_EXAMPLES", "300"))

INTERESTING = [0, 1, 2, 47, 48, 63, 64, 65, 127, 128, 255, 4096, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1,
               2**32, 2**32 + 1, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 48, 2**64 - 1]


# ------------------------------------------------------------------ checkers
def read_everything(path: Path) -> None:
    """Open, list, extract every blob (checking its SHA-256, as import does)."""
    reader = BkpReader(path)
    try:
        m = reader.manifest
        blobs = [(e.blob, e.record.sha256) for e in reader.iter_instances()] + \
                [(e.blob, e.record.sha256) for e in m.attachments]
        for blob, sha in blobs:
            digest = hashlib.sha256()
            with reader.open_blob(blob) as fh:
                while chunk := fh.read(1 << 16):
                    digest.update(chunk)
            _ = digest.hexdigest() == sha  # a mismatch is the caller's business, not an exception
    finally:
        reader.close()


def checkers() -> list[tuple[str, Callable[[Path], object]]]:
    found: list[tuple[str, Callable[[Path], object]]] = [("reader", read_everything)]
    try:  # written in parallel by others; fuzzed as soon as it exists
        from dicomvault.formats.bkp.validate import validate  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        found.append(("validate", validate))
    return found


# ------------------------------------------------------------------ the good files
@dataclass(frozen=True)
class Golden:
    data: bytes
    moff: int
    mlen: int
    frames: tuple[tuple[int, int], ...]  # (offset, stored) of each data frame
    manifest: bytes  # the decoded MessagePack

    def __repr__(self) -> str:
        return f"Golden({len(self.data)} bytes, {len(self.frames)} data frames)"

    @classmethod
    def load(cls, path: Path) -> Golden:
        data = path.read_bytes()
        moff, mlen, _n, _id = unpack_footer(data[-FOOTER.size:])
        r = BkpReader(path)
        try:
            frames = tuple((fe.offset, fe.stored) for fe in r.manifest.frames)
        finally:
            r.close()
        _t, codec, _s, stored, raw, _c = unpack_frame_header(data[moff:moff + FRAME.size], moff)
        payload = data[moff + FRAME.size:moff + FRAME.size + stored]
        manifest = zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw) \
            if codec == CODEC_ZSTD else payload
        return cls(data, moff, mlen, frames, manifest)

    def structures(self) -> list[tuple[int, int]]:
        """(start, length) of every binary structure and payload."""
        out = [(0, HEADER.size), (len(self.data) - FOOTER.size, FOOTER.size), (self.moff, self.mlen)]
        out += [(off, FRAME.size) for off, _ in self.frames] + \
               [(off + FRAME.size, stored) for off, stored in self.frames if stored]
        return out


# ------------------------------------------------------------------ mutations
def _rehash(buf: bytearray, start: int, covered: int) -> None:
    """Make the XXH3 of ``buf[start:start+covered]`` (stored right after it) valid."""
    if start + covered + 8 <= len(buf):
        buf[start + covered:start + covered + 8] = struct.pack("<Q", xxh3(bytes(buf[start:start + covered])))


def _fix_frame(buf: bytearray, off: int) -> None:
    """Recompute a frame header's payload and header checksums after a change."""
    if off + FRAME.size > len(buf):
        return
    stored = struct.unpack_from("<Q", buf, off + 16)[0]
    payload = bytes(buf[off + FRAME.size:off + FRAME.size + min(stored, len(buf))])
    struct.pack_into("<Q", buf, off + 32, xxh3(payload))
    _rehash(buf, off, 40)


def _set_field(buf: bytearray, start: int, field_at: int, fmt: str, value: int, covered: int) -> None:
    size = struct.calcsize(fmt)
    if start < 0 or start + field_at + size > len(buf):
        return
    value &= (1 << (8 * size)) - 1
    struct.pack_into(fmt, buf, start + field_at, value)
    _rehash(buf, start, covered)


def _bomb(announced: int, content: bytes) -> bytes:
    """A zstd frame that announces ``announced`` bytes (8-byte Frame_Content_Size,
    single segment) but holds one raw block of ``content``, no checksum."""
    fhd = 0b11 << 6 | 1 << 5
    block = struct.pack("<I", 1 | (len(content) << 3))[:3]  # last block, raw, size
    return b"\x28\xb5\x2f\xfd" + bytes([fhd]) + struct.pack("<Q", announced) + block + content


def _with_manifest(g: Golden, buf: bytes, raw: bytes, codec: int) -> bytes:
    """``buf`` up to the manifest, then a new manifest frame and footer, all valid."""
    payload = zstandard.ZstdCompressor(write_checksum=True).compress(raw) if codec == CODEC_ZSTD else raw
    nframes = len(g.frames)
    frame = pack_frame_header(FRAME_MANIFEST, codec, nframes, len(payload), len(raw), xxh3(payload)) + payload
    file_id = g.data[16:32]
    return buf[:g.moff] + frame + pack_footer(g.moff, len(frame), nframes, file_id)


def _mutate_tree(obj: object, draw: st.DrawFn, depth: int = 0) -> object:
    """Change one value somewhere in a decoded (untyped) manifest."""
    if isinstance(obj, dict) and obj and depth < 6:
        key = draw(st.sampled_from(sorted(obj, key=str)))
        action = draw(st.sampled_from(["descend", "descend", "drop", "retype"]))
        if action == "drop":
            del obj[key]
        elif action == "retype":
            obj[key] = draw(_scalar)
        else:
            obj[key] = _mutate_tree(obj[key], draw, depth + 1)
        return obj
    if isinstance(obj, list) and obj and depth < 6:
        i = draw(st.integers(0, len(obj) - 1))
        action = draw(st.sampled_from(["descend", "descend", "drop", "dup", "retype"]))
        if action == "drop":
            del obj[i]
        elif action == "dup":
            obj.insert(i, obj[i])
        elif action == "retype":
            obj[i] = draw(_scalar)
        else:
            obj[i] = _mutate_tree(obj[i], draw, depth + 1)
        return obj
    if isinstance(obj, int) and not isinstance(obj, bool):
        return draw(st.one_of(st.sampled_from(INTERESTING), st.sampled_from([-1, -(2**63)]),
                              st.integers(max(obj - 3, -(2**63)), min(obj + 3, 2**64 - 1))))
    return draw(_scalar)


_scalar = st.one_of(st.none(), st.booleans(), st.sampled_from(INTERESTING), st.integers(-(2**63), -1),
                    st.text(max_size=5), st.binary(max_size=5), st.floats(allow_nan=False),
                    st.just([]), st.just({}))


GOLDENS: list[Golden] = []  # by index: hypothesis would print every byte of the files otherwise


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    g = GOLDENS[draw(st.integers(0, len(GOLDENS) - 1))]
    buf = bytearray(g.data)
    structures = g.structures()
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "flip", "truncate", "overwrite", "field", "field", "payload",
                                     "manifest", "manifest", "manifest-bytes", "bomb"]))
        size = len(buf)
        if kind in ("flip", "overwrite") and size:
            start, length = draw(st.sampled_from([(0, size), *structures]))
            pos = min(start + draw(st.integers(0, max(0, length - 1))), size - 1)
            if kind == "flip":
                buf[pos] ^= 1 << draw(st.integers(0, 7))
            else:
                new = draw(st.binary(min_size=1, max_size=24))
                buf[pos:pos + len(new)] = new
        elif kind == "truncate":
            cut = draw(st.one_of(st.integers(0, size), st.sampled_from(
                [max(0, s + d) for s, n in structures for d in (0, 1, n - 1, n)])))
            del buf[cut:]
        elif kind == "field":
            which = draw(st.sampled_from(["header", "footer", "manifest frame", "data frame"]))
            value = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**64 - 1)))
            if which == "header":
                at, fmt = draw(st.sampled_from([(8, "<H"), (10, "<H"), (12, "<I"), (32, "<Q"), (40, "<Q")]))
                _set_field(buf, 0, at, fmt, value, 56)
            elif which == "footer":
                at = draw(st.sampled_from([0, 8, 16, 24, 40]))
                _set_field(buf, len(buf) - FOOTER.size, at, "<Q", value, 48)
            else:
                if which == "data frame" and g.frames:
                    off = draw(st.sampled_from(g.frames))[0]
                else:
                    off = g.moff
                at, fmt = draw(st.sampled_from([(4, "<B"), (5, "<B"), (6, "<H"), (8, "<Q"), (16, "<Q"),
                                                (24, "<Q"), (32, "<Q")]))
                _set_field(buf, off, at, fmt, value, 40)
        elif kind == "payload":
            off, stored = draw(st.sampled_from([*g.frames, (g.moff, g.mlen - FRAME.size)]))
            if stored and off + FRAME.size + stored <= len(buf):
                pos = off + FRAME.size + draw(st.integers(0, stored - 1))
                new = draw(st.binary(min_size=1, max_size=16))
                end = min(pos + len(new), off + FRAME.size + stored)
                buf[pos:end] = new[:end - pos]
                _fix_frame(buf, off)
        elif kind == "bomb":
            # a frame whose header (and index entry) agree with a zstd frame
            # announcing a huge size: the reader must not allocate it
            announced = draw(st.sampled_from([2**31, 2**32 - 1, 2**32, 2**33, 2**40, 2**62]))
            target = draw(st.sampled_from(["manifest", *(["data"] if g.frames else [])]))
            bomb = _bomb(announced, b"x" * draw(st.integers(0, 64)))
            if target == "manifest":
                frame = pack_frame_header(FRAME_MANIFEST, CODEC_ZSTD, len(g.frames), len(bomb), announced,
                                          xxh3(bomb)) + bomb
                buf = bytearray(bytes(buf[:g.moff]) + frame
                                + pack_footer(g.moff, len(frame), len(g.frames), g.data[16:32]))
            else:
                i = draw(st.integers(0, len(g.frames) - 1))
                tree = msgspec.msgpack.decode(g.manifest)
                return _bomb_data_frame(g, i, announced, bomb, tree)
        elif kind == "manifest":
            tree = msgspec.msgpack.decode(g.manifest)
            for _ in range(draw(st.integers(1, 3))):
                tree = _mutate_tree(tree, draw)
            raw = msgspec.msgpack.encode(tree)
            codec = draw(st.sampled_from([CODEC_NONE, CODEC_ZSTD]))
            buf = bytearray(_with_manifest(g, bytes(buf), raw, codec))
        elif kind == "manifest-bytes":
            raw = bytearray(g.manifest)
            pos = draw(st.integers(0, len(raw) - 1))
            new = draw(st.one_of(
                st.binary(min_size=1, max_size=12),
                # MessagePack headers with 32-bit lengths (array, map, str, bin), huge
                st.sampled_from([b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xf0",
                                 b"\xc6\x7f\xff\xff\xff", b"\xdc\xff\xff", b"\xcf" + b"\xff" * 8,
                                 b"\xd3\x80" + bytes(7)])))
            if draw(st.booleans()):
                raw[pos:pos + len(new)] = new
            else:
                raw[pos:pos] = new
            buf = bytearray(_with_manifest(g, bytes(buf), bytes(raw),
                                           draw(st.sampled_from([CODEC_NONE, CODEC_ZSTD]))))
    return bytes(buf)


def _bomb_data_frame(g: Golden, i: int, announced: int, bomb: bytes, tree: object) -> bytes:
    """Data frame ``i`` replaced by ``bomb`` in place (the frames after it
    move), header, index and footer consistent, every checksum valid."""
    off, stored = g.frames[i]
    delta = len(bomb) - stored
    assert isinstance(tree, dict)
    frames = tree["frames"]
    new_frames, stream = [], 0
    for j, (f_off, f_stored, f_raw, f_codec, _so) in enumerate(frames):
        if j == i:
            f_stored, f_raw, f_codec = len(bomb), announced, CODEC_ZSTD
        elif j > i:
            f_off += delta
        new_frames.append([f_off, f_stored, f_raw, f_codec, stream])
        stream += f_raw
    tree["frames"] = new_frames
    data = g.data
    head = bytearray(data[off:off + FRAME.size])
    struct.pack_into("<BH", head, 5, CODEC_ZSTD, 0)
    struct.pack_into("<QQQQ", head, 8, i, len(bomb), announced, xxh3(bomb))
    _rehash(head, 0, 40)
    body = data[:off] + bytes(head) + bomb + data[off + FRAME.size + stored:g.moff]
    shifted = Golden(data, g.moff + delta, g.mlen, g.frames, g.manifest)
    return _with_manifest(shifted, body, msgspec.msgpack.encode(tree), CODEC_NONE)


# ------------------------------------------------------------------ the run
OUTCOMES: collections.Counter[str] = collections.Counter()


def check(data: bytes, workdir: Path) -> None:
    path = workdir / "fuzzed.bkp"
    path.write_bytes(data)
    for name, fn in checkers():
        try:
            fn(path)
            OUTCOMES[f"{name}: ok"] += 1
        except ALLOWED as exc:
            OUTCOMES[f"{name}: {type(exc).__name__}"] += 1
        except BaseException as exc:
            raise AssertionError(f"{name} raised {type(exc).__name__}: {exc}") from exc


def run(goldens: list[Golden], workdir: Path) -> None:
    GOLDENS[:] = goldens

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=True,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(mutated())
    def fuzz(data: bytes) -> None:
        check(data, workdir)

    fuzz()


def limit_memory(extra_mb: int) -> None:
    """Cap the address space at what is mapped now plus ``extra_mb``."""
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) for line in fh if line.startswith("VmSize:"))  # KiB
    cap = vm * 1024 + extra_mb * (1 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def main(argv: list[str]) -> int:
    extra_mb, paths = int(argv[0]), [Path(p) for p in argv[1:]]
    goldens = [Golden.load(p) for p in paths]
    for g in goldens:  # the good files themselves pass
        with tempfile.TemporaryDirectory() as tmp:
            check(g.data, Path(tmp))
    limit_memory(extra_mb)
    with tempfile.TemporaryDirectory() as tmp:
        failures = []
        for name, data in explicit_cases(goldens):
            try:
                check(data, Path(tmp))
            except AssertionError as exc:
                failures.append(f"{name}: {exc}")
        if failures:
            print("explicit cases failed:\n  " + "\n  ".join(failures), file=sys.stderr)
            return 1
        run(goldens, Path(tmp))
    print(f"fuzzed {EXAMPLES} examples over {len(goldens)} files with {[n for n, _ in checkers()]}")
    print("outcomes (explicit cases, generation and shrinking):", dict(sorted(OUTCOMES.items())))
    return 0


def explicit_cases(goldens: list[Golden]) -> Iterator[tuple[str, bytes]]:
    """Hand-made worst cases, also run under the memory cap."""
    for g in goldens:
        for announced in (2**31, 2**32, 2**40, 2**63):
            bomb = _bomb(announced, b"x" * 10)
            frame = pack_frame_header(FRAME_MANIFEST, CODEC_ZSTD, len(g.frames), len(bomb), announced,
                                      xxh3(bomb)) + bomb
            yield (f"manifest announcing {announced}",
                   g.data[:g.moff] + frame + pack_footer(g.moff, len(frame), len(g.frames), g.data[16:32]))
            for i in range(len(g.frames)):
                yield (f"data frame {i} announcing {announced}",
                       _bomb_data_frame(g, i, announced, bomb, msgspec.msgpack.decode(g.manifest)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
