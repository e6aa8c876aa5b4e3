"""Keep SPEC.md honest.

Four kinds of checks:

* the constants, byte layout tables, checksum coverage, test vectors and manifest schema tables are
  parsed out of SPEC.md and compared with the code (``layout``, ``manifest``, the engine records);
* the annotated example in SPEC.md is checked for internal consistency (its checksums recompute,
  its footer points at its manifest) and against pydicom's public ``rtplan.dcm``;
* ``SpecReader`` below is a small reader written from SPEC.md alone, using only the standard
  library, ``zstandard`` and ``msgspec`` (it even carries its own XXH3-64, so it does not need the
  ``xxhash`` package). It must list and extract every instance and attachment of a .bkp that the
  real ``dicomvault`` command wrote from real pydicom files, with SHA-256s that match the manifest
  and the source files, reading only the frames a blob needs; it reads manifest pages (format 1.1,
  SPEC.md section 8.7) and, for some series, only the pages that name them;
* on damaged and crafted files, ``SpecReader`` and the real reader must raise the same error class
  (SPEC.md section 12), and both must read a crafted "newer minor version" file.

Only the checks in the first two groups import ``dicomvault.formats``; ``SpecReader`` does not.
"""
from __future__ import annotations

import ast
import bisect
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import zstandard

SPEC = Path(__file__).resolve().parent.parent / "SPEC.md"


# --------------------------------------------------------------------------- reading SPEC.md


def _spec_text() -> str:
    return SPEC.read_text(encoding="utf-8")


def _after_marker(marker: str) -> list[str]:
    lines = _spec_text().splitlines()
    tag = f"<!-- {marker} -->"
    hits = [i for i, line in enumerate(lines) if line.strip() == tag]
    assert len(hits) == 1, f"SPEC.md must contain exactly one {tag}"
    return lines[hits[0] + 1:]


def _table(marker: str) -> list[list[str]]:
    """The rows (cells stripped, header and separator dropped) of the table after ``marker``."""
    rows: list[list[str]] = []
    for line in _after_marker(marker):
        if not line.strip():
            if rows:
                break
            continue
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    assert len(rows) >= 3, f"no table after {marker}"
    return rows[2:]


def _code_block(marker: str) -> str:
    lines = _after_marker(marker)
    start = next(i for i, line in enumerate(lines) if line.startswith("```"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    return "\n".join(lines[start + 1:end])


def _unquote(cell: str) -> str:
    return cell.strip().strip("`")


def _hex_bytes(cell: str) -> bytes:
    return bytes.fromhex(_unquote(cell).replace(" ", ""))


def _vector_input(cell: str) -> bytes:
    text = _unquote(cell)
    m = re.fullmatch(r"bytes\(range\((\d+)\)\)(?: \* (\d+))?", text)
    if m:
        return bytes(range(int(m[1]))) * int(m[2] or 1)
    m = re.fullmatch(r'(b".*")(?: \* (\d+))?', text)
    assert m, f"cannot read test vector input {text!r}"
    return ast.literal_eval(m[1]) * int(m[2] or 1)


def _parse_dump(text: str) -> tuple[int, bytes]:
    """(offset of the first byte, bytes) from xxd-like lines ``OFFSET  hh hh ...  |ascii|``."""
    first = None
    data = bytearray()
    for line in text.splitlines():
        offset_text, rest = line.split(None, 1)
        offset = int(offset_text, 16)
        if first is None:
            first = offset
        assert offset == first + len(data), f"dump line at {offset:#x} is out of sequence"
        data += bytes.fromhex(rest.split("|", 1)[0].replace(" ", ""))
    assert first is not None
    return first, bytes(data)


# --------------------------------------------------------------------------- XXH3-64 from its spec

_M64 = (1 << 64) - 1
_P32_1, _P32_2, _P32_3 = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D
_P64_1, _P64_2, _P64_3 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
_P64_4, _P64_5 = 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5
_MX1, _MX2 = 0x165667919E3779F9, 0x9FB21C651E98DF25
_SECRET = bytes.fromhex(  # the default 192-byte secret of XXH3
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e")
_S64 = [int.from_bytes(_SECRET[i:i + 8], "little") for i in range(len(_SECRET) - 7)]
_STRIPE = struct.Struct("<8Q")


def _le64(b: bytes, i: int) -> int:
    return int.from_bytes(b[i:i + 8], "little")


def _xxh64_avalanche(h: int) -> int:
    h ^= h >> 33
    h = (h * _P64_2) & _M64
    h ^= h >> 29
    h = (h * _P64_3) & _M64
    return h ^ (h >> 32)


def _xxh3_avalanche(h: int) -> int:
    h ^= h >> 37
    h = (h * _MX1) & _M64
    return h ^ (h >> 32)


def _mul_fold(a: int, b: int) -> int:
    product = a * b
    return (product & _M64) ^ (product >> 64)


def _mix16(b: bytes, i: int, s: int) -> int:
    return _mul_fold(_le64(b, i) ^ _S64[s], _le64(b, i + 8) ^ _S64[s + 8])


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M64


def xxh3_64(data: bytes | bytearray | memoryview) -> int:
    """XXH3-64 with seed 0 and the default secret, in pure Python (slow, but enough for tests)."""
    b = bytes(data)
    n = len(b)
    if n == 0:
        return _xxh64_avalanche(_S64[56] ^ _S64[64])
    if n <= 3:
        combined = (b[0] << 16) | (b[n >> 1] << 24) | b[n - 1] | (n << 8)
        flip = int.from_bytes(_SECRET[:4], "little") ^ int.from_bytes(_SECRET[4:8], "little")
        return _xxh64_avalanche(combined ^ flip)
    if n <= 8:
        word = int.from_bytes(b[n - 4:], "little") | (int.from_bytes(b[:4], "little") << 32)
        acc = (_S64[8] ^ _S64[16]) ^ word
        acc ^= _rotl(acc, 49) ^ _rotl(acc, 24)
        acc = (acc * _MX2) & _M64
        acc ^= ((acc >> 35) + n) & _M64
        acc = (acc * _MX2) & _M64
        return acc ^ (acc >> 28)
    if n <= 16:
        lo = (_S64[24] ^ _S64[32]) ^ _le64(b, 0)
        hi = (_S64[40] ^ _S64[48]) ^ _le64(b, n - 8)
        swapped = int.from_bytes(lo.to_bytes(8, "little"), "big")
        return _xxh3_avalanche((n + swapped + hi + _mul_fold(lo, hi)) & _M64)
    if n <= 128:
        acc = n * _P64_1
        for j in range((n - 1) // 32, -1, -1):
            acc += _mix16(b, 16 * j, 32 * j) + _mix16(b, n - 16 * (j + 1), 32 * j + 16)
        return _xxh3_avalanche(acc & _M64)
    if n <= 240:
        acc = n * _P64_1
        for j in range(8):
            acc += _mix16(b, 16 * j, 16 * j)
        acc = _xxh3_avalanche(acc & _M64)
        for j in range(8, n // 16):
            acc += _mix16(b, 16 * j, 16 * (j - 8) + 3)
        acc += _mix16(b, n - 16, 136 - 17)
        return _xxh3_avalanche(acc & _M64)
    accs = [_P32_3, _P64_1, _P64_2, _P64_3, _P64_4, _P32_2, _P64_5, _P32_1]

    def stripe(pos: int, s: int) -> None:
        words = _STRIPE.unpack_from(b, pos)
        for i in range(8):
            value = words[i]
            key = value ^ _S64[s + 8 * i]
            accs[i ^ 1] = (accs[i ^ 1] + value) & _M64
            accs[i] = (accs[i] + (key & 0xFFFFFFFF) * (key >> 32)) & _M64

    stripes_per_block = (len(_SECRET) - 64) // 8
    block = 64 * stripes_per_block
    blocks = (n - 1) // block
    for k in range(blocks):
        for st in range(stripes_per_block):
            stripe(k * block + 64 * st, 8 * st)
        for i in range(8):
            a = accs[i] ^ (accs[i] >> 47) ^ _S64[len(_SECRET) - 64 + 8 * i]
            accs[i] = (a * _P32_1) & _M64
    base = blocks * block
    for st in range((n - 1 - base) // 64):
        stripe(base + 64 * st, 8 * st)
    stripe(n - 64, len(_SECRET) - 64 - 7)
    result = n * _P64_1
    for i in range(4):
        result += _mul_fold(accs[2 * i] ^ _S64[11 + 16 * i], accs[2 * i + 1] ^ _S64[11 + 16 * i + 8])
    return _xxh3_avalanche(result & _M64)


# --------------------------------------------------------------------------- an independent reader
# Written from SPEC.md only: sections 3-6 (layout), 7 (checksums), 8 (manifest, 8.7 manifest pages),
# 9 (versions and features), 10 (reading, 10.4 reading the instance entries) and 12 (error classes).
# It implements the required feature "manifest-pages" (format 1.1), not encryption nor volume sets.


class SpecError(Exception):
    kind = "?"


class NotABackup(SpecError):
    kind = "not a backup"


class Truncated(SpecError):
    kind = "truncated"


class Checksum(SpecError):
    kind = "checksum"


class Corrupt(SpecError):
    kind = "corrupt"


class UnsupportedVersion(SpecError):
    kind = "unsupported version"


class UnsupportedFeature(SpecError):
    kind = "unsupported feature"


S_HEADER = struct.Struct("<8sHHI16sq16sQ")
S_FRAME = struct.Struct("<4sBBHQQQQQ")
S_FOOTER = struct.Struct("<QQQ16s8sQ8s")
M_HEADER, M_FRAME, M_FOOTER = b"\x89DVBKP\r\n", b"DVFR", b"DVBKPEND"
KNOWN_FEATURES: frozenset[str] = frozenset({"manifest-pages"})
LEVELS = ("patient", "study", "series", "instance")
MANIFEST_LIMIT = 1 << 32
PAGE_LIMIT = MANIFEST_LIMIT  # section 10.4: a reader MAY refuse a larger page
FRAME_PAGE = 4
PAGE_SEQ_BASE = 1 << 63
# InstanceRecord (section 8.5): field -> (accepted types, default); sop_uid and series_uid are required
_INSTANCE_FIELDS: dict[str, tuple[tuple[type, ...], object]] = {
    "sop_class_uid": ((str,), ""), "transfer_syntax": ((str,), ""), "number": ((int, type(None)), None),
    "size": ((int,), 0), "sha256": ((str,), ""), "imported_at": ((str,), ""), "origin": ((str,), ""),
}


def _is_int(value: object) -> bool:
    """A MessagePack integer (msgspec decodes true/false as bool, a subclass of int: not an int here)."""
    return type(value) is int


def _check_instance_entry(entry: object, stream_size: int, where: str) -> None:
    """An InstanceEntry (section 8.3) with its record (8.5): types, blob in the stream (10.1 step 19)
    and ``size == length`` (8.7 rule 4, 8.6 rule 3). *corrupt* otherwise."""
    if not isinstance(entry, dict) or not isinstance(entry.get("record"), dict) \
            or not isinstance(entry.get("blob"), list):
        raise Corrupt(f"{where}: not an InstanceEntry")
    rec, blob = entry["record"], entry["blob"]
    if not isinstance(rec.get("sop_uid"), str) or not isinstance(rec.get("series_uid"), str):
        raise Corrupt(f"{where}: the record lacks sop_uid or series_uid")
    for name, (types, _default) in _INSTANCE_FIELDS.items():
        if name in rec and not (isinstance(rec[name], types) and type(rec[name]) is not bool):
            raise Corrupt(f"{where}: record field {name} has the wrong type")
    if len(blob) < 2 or not all(_is_int(v) for v in blob[:2]):
        raise Corrupt(f"{where}: bad blob")
    offset, length = blob[0], blob[1]
    if offset < 0 or length < 0 or offset + length > stream_size:
        raise Corrupt(f"{where}: its blob points outside the payload stream")
    if rec.get("size", 0) != length:
        raise Corrupt(f"{where}: its record says {rec.get('size', 0)} bytes, its blob {length}")


class SpecReader:
    """Lists and extracts a .bkp following SPEC.md section 10."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.fh = open(path, "rb")  # closed by close()
        self.frames_read: list[int] = []  # data frames decoded, in the order read
        self.pages_read: list[int] = []  # page frames decoded (section 10.4), in the order read
        self._last: tuple[int, bytes] | None = None
        try:
            self._open()
        except BaseException:
            self.fh.close()
            raise

    def close(self) -> None:
        self.fh.close()

    def __enter__(self) -> SpecReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pread(self, offset: int, length: int) -> bytes:
        return os.pread(self.fh.fileno(), length, offset)

    def _open(self) -> None:
        size = os.fstat(self.fh.fileno()).st_size
        head = self._pread(0, 64)
        if len(head) < 8 or head[:8] != M_HEADER:
            raise NotABackup("not a .bkp file")
        if len(head) < 64:
            raise Truncated("the header is incomplete")
        _m, major, minor, flags, file_id, _created, reserved, check = S_HEADER.unpack(head)
        if xxh3_64(head[:56]) != check:
            raise Checksum("header checksum")
        if major != 1:
            raise UnsupportedVersion(f"format version {major}.{minor}")
        if flags or reserved != bytes(16):
            raise Corrupt("reserved header field")
        if size < 128:
            raise Truncated("no room for a footer")
        foot = self._pread(size - 64, 64)
        if foot[-8:] != M_FOOTER:
            raise Truncated("the footer is missing")
        moff, mlen, nframes, foot_id, foot_reserved, foot_check, _m2 = S_FOOTER.unpack(foot)
        if xxh3_64(foot[:48]) != foot_check:
            raise Checksum("footer checksum")
        if foot_reserved != bytes(8):
            raise Corrupt("reserved footer field")
        if foot_id != file_id:
            raise Corrupt("header and footer file_id differ")
        if not (64 <= moff and mlen >= 48 and moff + mlen <= size - 64):
            raise Corrupt("the footer points outside the file")
        ftype, codec, _seq, stored, raw, pcheck = self._frame_header(moff)
        if ftype != 2 or stored != mlen - 48:
            raise Corrupt("the footer does not point at the manifest frame")
        if raw > MANIFEST_LIMIT:
            raise Corrupt("manifest too large")
        try:
            m = msgspec.msgpack.decode(self._payload(moff, codec, stored, raw, pcheck))
        except msgspec.DecodeError as exc:
            raise Corrupt(f"manifest is not MessagePack: {exc}") from exc
        try:
            self._check_manifest(m, nframes, moff)
        except (KeyError, TypeError, IndexError) as exc:
            raise Corrupt(f"manifest does not follow the schema: {exc!r}") from exc
        self.manifest = m

    def _check_manifest(self, m: dict, nframes: int, moff: int) -> None:
        if not isinstance(m, dict) or not all(isinstance(m[k], str) for k in ("writer", "created")):
            raise Corrupt("manifest is not a map with writer and created")
        if not isinstance(m["major"], int) or not isinstance(m["minor"], int):
            raise Corrupt("bad version numbers")
        for group in ("patients", "studies", "series", "instances", "attributes", "attachments",
                      "frames", "required_features", "optional_features"):
            if not isinstance(m.get(group, []), list):
                raise Corrupt(f"{group} is not an array")
        for entry in (*m.get("attributes", []), *(e["record"] for e in m.get("attachments", []))):
            if entry["level"] not in LEVELS:
                raise Corrupt(f"unknown level {entry['level']!r}")
        if m["major"] != 1:
            raise UnsupportedVersion(f"manifest format version {m['major']}.{m['minor']}")
        unknown = [f for f in m.get("required_features", []) if f not in KNOWN_FEATURES]
        if unknown:
            raise UnsupportedFeature("needs " + ", ".join(unknown))
        frames = m.get("frames", [])
        if len(frames) != nframes:
            raise Corrupt("frame count differs from the footer")
        self.frames = [tuple(int(v) for v in fe[:5]) for fe in frames]  # extra trailing elements ignored
        running = 0
        for offset, stored, raw, _codec, stream_offset in self.frames:
            if stream_offset != running or offset < 64 or offset + 48 + stored > moff:
                raise Corrupt("inconsistent frame index entry")
            running += raw
        self.stream_size = running
        self.starts = [fe[4] for fe in self.frames]
        for k, entry in enumerate(m.get("instances", [])):
            _check_instance_entry(entry, running, f"manifest instance {k}")
        for entry in m.get("attachments", []):
            offset, length = entry["blob"][:2]
            if offset < 0 or length < 0 or offset + length > running:
                raise Corrupt("a blob points outside the payload stream")
        # step 20 and section 8.7 rule 5: pages exactly with the feature, never an empty index
        paged = "manifest-pages" in m.get("required_features", [])
        if paged != ("pages" in m):
            raise Corrupt("pages and the required feature manifest-pages must come together")
        pages = m.get("pages", [])
        if not isinstance(pages, list) or (paged and not pages):
            raise Corrupt("the page index is not a non-empty array")
        self.pages: list[tuple[int, int, int, int, int, frozenset[str]]] = []
        for k, pe in enumerate(pages):
            if not isinstance(pe, list) or len(pe) < 6 or not all(_is_int(v) for v in pe[:5]) \
                    or not isinstance(pe[5], list) or not all(isinstance(s, str) for s in pe[5]):
                raise Corrupt(f"page index entry {k} does not follow the schema")
            offset, stored, raw, codec, count = pe[:5]  # extra trailing elements ignored
            if min(pe[:5]) < 0 or offset < 64 or offset + 48 + stored > moff or count < 1:
                raise Corrupt(f"page index entry {k} is out of bounds or empty")
            self.pages.append((offset, stored, raw, codec, count, frozenset(pe[5])))

    def _frame_header(self, where: int) -> tuple[int, int, int, int, int, int]:
        head = self._pread(where, 48)
        if len(head) < 48:
            raise Truncated(f"frame header at {where} is incomplete")
        magic, ftype, codec, reserved, seq, stored, raw, pcheck, hcheck = S_FRAME.unpack(head)
        if magic != M_FRAME:
            raise Corrupt(f"bad frame magic at {where}")
        if xxh3_64(head[:40]) != hcheck:
            raise Checksum(f"frame header checksum at {where}")
        if reserved:
            raise Corrupt(f"reserved frame field at {where}")
        if codec not in (0, 1):
            raise UnsupportedFeature(f"codec {codec} at {where}")
        return ftype, codec, seq, stored, raw, pcheck

    def _payload(self, where: int, codec: int, stored: int, raw: int, pcheck: int) -> bytes:
        payload = self._pread(where + 48, stored)
        if len(payload) != stored:
            raise Truncated(f"frame payload at {where} is incomplete")
        if xxh3_64(payload) != pcheck:
            raise Checksum(f"frame payload checksum at {where}")
        if codec == 0:
            data = payload
        else:
            try:
                params = zstandard.get_frame_parameters(payload)
            except zstandard.ZstdError as exc:
                raise Checksum(f"not a zstd frame at {where}") from exc
            if params.content_size != raw:  # checked before anything is allocated
                raise Corrupt(f"zstd content size {params.content_size} at {where}, {raw} announced")
            try:
                data = zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw)
            except zstandard.ZstdError as exc:
                raise Checksum(f"zstd frame at {where} does not decode: {exc}") from exc
        if len(data) != raw:
            raise Corrupt(f"frame at {where} decodes to {len(data)} bytes, {raw} announced")
        return data

    def data_frame(self, i: int) -> bytes:
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        offset, stored, raw, codec, _stream_offset = self.frames[i]
        ftype, fcodec, seq, fstored, fraw, pcheck = self._frame_header(offset)
        if ftype != 1 or seq != i or (fstored, fraw, fcodec) != (stored, raw, codec):
            raise Corrupt(f"data frame {i} does not match the index")
        data = self._payload(offset, codec, stored, raw, pcheck)
        self.frames_read.append(i)
        self._last = (i, data)
        return data

    def read_page(self, k: int) -> list[dict]:
        """The entries of page ``k``, read and checked as in section 10.4 (not kept: the caller lets
        go of them before the next page)."""
        offset, stored, raw, codec, count, series = self.pages[k]
        ftype, fcodec, seq, fstored, fraw, pcheck = self._frame_header(offset)
        if ftype != FRAME_PAGE or seq != PAGE_SEQ_BASE + k or (fstored, fraw, fcodec) != (stored, raw, codec):
            raise Corrupt(f"page frame {k} at {offset} does not match the page index")
        if raw > PAGE_LIMIT:
            raise Corrupt(f"page {k} too large")
        content = self._payload(offset, codec, stored, raw, pcheck)
        self.pages_read.append(k)
        try:
            entries = msgspec.msgpack.decode(content)
        except msgspec.DecodeError as exc:
            raise Corrupt(f"page {k} is not MessagePack: {exc}") from exc
        if not isinstance(entries, list) or len(entries) != count:  # rule 3
            raise Corrupt(f"page {k} does not hold an array of {count} entries")
        for j, entry in enumerate(entries):
            _check_instance_entry(entry, self.stream_size, f"page {k} entry {j}")  # rule 4
            if entry["record"]["series_uid"] not in series:  # rule 3
                raise Corrupt(f"page {k} entry {j}: series {entry['record']['series_uid']} not in the index")
        return entries

    def iter_instances(self, series: set[str] | frozenset[str] | None = None) -> Iterator[dict]:
        """Every instance entry (or those of ``series``) in file order: the manifest's ``instances``,
        then page 0, 1, ... (section 10.4), one page at a time; a page whose index entry names none
        of ``series`` is not read."""
        for entry in self.manifest.get("instances", []):
            if series is None or entry["record"]["series_uid"] in series:
                yield entry
        for k, page in enumerate(self.pages):
            if series is not None and series.isdisjoint(page[5]):
                continue
            for entry in self.read_page(k):
                if series is None or entry["record"]["series_uid"] in series:
                    yield entry

    def instances(self, series: set[str] | frozenset[str] | None = None) -> list[dict]:
        return list(self.iter_instances(series))

    def extract(self, blob: list[int]) -> bytes:
        offset, length = blob[0], blob[1]
        out = bytearray()
        if length == 0:
            return b""
        i = bisect.bisect_right(self.starts, offset) - 1
        while len(out) < length:
            data = self.data_frame(i)
            start = offset + len(out) - self.starts[i]
            out += data[start:start + length - len(out)]
            i += 1
        return bytes(out)

    def listing(self) -> dict[str, dict[str, dict[str, list[str]]]]:
        """patient key -> study UID -> series UID -> SOP Instance UIDs, from the manifest and its
        pages (no data frame is read)."""
        m = self.manifest
        study_of = {s["series_uid"]: s["study_uid"] for s in m["series"]}
        patient_of = {s["study_uid"]: s["patient_key"] for s in m["studies"]}
        tree: dict[str, dict[str, dict[str, list[str]]]] = {}
        for entry in self.iter_instances():
            series = entry["record"]["series_uid"]
            study = study_of[series]
            tree.setdefault(patient_of[study], {}).setdefault(study, {}).setdefault(series, []).append(
                entry["record"]["sop_uid"])
        return tree


# --------------------------------------------------------------------------- .bkp files from the CLI


def _cli(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.run([sys.executable, "-m", "dicomvault", "-q", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def _pydicom_data() -> Path:
    import pydicom

    return Path(pydicom.__file__).parent / "data"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def tiny_bkp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The file of SPEC.md section 14: one real DICOM file, exported by the CLI."""
    work = tmp_path_factory.mktemp("tiny")
    shutil.copy(_pydicom_data() / "test_files" / "rtplan.dcm", work / "rtplan.dcm")
    assert _cli("--db", work / "db", "import-dicom", work / "rtplan.dcm").returncode == 0
    done = _cli("--db", work / "db", "export-db", work / "tiny.bkp", "--whole")
    assert done.returncode == 0, done.stderr
    return work / "tiny.bkp"


@pytest.fixture(scope="module")
def real_bkp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, list[Path]]:
    """A .bkp of every valid file in pydicom's test and charset folders plus a few larger files of
    pydicom-data (more than one frame), with one attachment. Returns (file, instances stored,
    source paths)."""
    work = tmp_path_factory.mktemp("real")
    data = _pydicom_data()
    sources = [data / "test_files", data / "charset_files"]
    try:
        import data_store  # the pydicom-data package

        extra = Path(data_store.__file__).parent / "data"
        sources += [extra / name for name in ("MR2_UNCI.dcm", "US1_UNCI.dcm", "RG3_UNCI.dcm")]
    except ImportError:  # pragma: no cover - pydicom-data is a test dependency
        pass
    db = work / "db"
    imported = _cli("--db", db, "--json", "import-dicom", *sources)
    assert imported.returncode in (0, 1), imported.stderr
    stored = json.loads(imported.stdout)["counts"]["instance"]["stored"]
    tree = json.loads(_cli("--db", db, "--json", "ls").stdout)
    note = work / "voi.csv"
    note.write_text("roi,mean\nliver,1.25\n")
    attached = _cli("--db", db, "attach", "--study", tree[0]["children"][0]["uid"], note)
    assert attached.returncode == 0, attached.stderr
    exported = _cli("--db", db, "export-db", work / "all.bkp", "--whole")
    assert exported.returncode == 0, exported.stderr
    files = [p for s in sources for p in (sorted(s.rglob("*")) if s.is_dir() else [s]) if p.is_file()]
    return work / "all.bkp", stored, [*files, note]


PAGED_ENTRIES = 4  # entries per manifest page in ``paged_bkp``, instead of the writer's 1,024


@pytest.fixture(scope="module")
def paged_bkp(real_bkp: tuple[Path, int, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The database of ``real_bkp`` exported again, in-process, by a writer whose pages hold
    ``PAGED_ENTRIES`` entries: a file with manifest pages (SPEC.md section 8.7)."""
    from dicomvault.cli.main import main
    from dicomvault.plugins import bkp_plugin

    out = tmp_path_factory.mktemp("paged") / "paged.bkp"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD", "1")
        mp.setattr(bkp_plugin, "PAGE_ENTRIES", PAGED_ENTRIES)
        code = main(["-q", "--db", str(real_bkp[0].parent / "db"), "export-db", str(out), "--whole"])
    assert code == 0 and out.is_file()
    return out


# --------------------------------------------------------------------------- the spec vs the code


def test_constants_match_layout() -> None:
    from dicomvault.formats.bkp import layout

    rows = _table("constants")
    assert {_unquote(r[0]) for r in rows} >= {"HEADER_MAGIC", "FRAME_MAGIC", "FOOTER_MAGIC", "MAJOR", "MINOR"}
    for name, value, hex_bytes, _meaning in rows:
        expected = getattr(layout, _unquote(name))
        assert ast.literal_eval(_unquote(value)) == expected, name
        if isinstance(expected, bytes):
            assert _hex_bytes(hex_bytes) == expected, name


_TYPE_NAMES = {"B": "u8", "H": "u16", "I": "u32", "Q": "u64", "q": "i64"}


def _struct_layout(st: struct.Struct) -> list[tuple[int, int, str]]:
    assert st.format.startswith("<"), "SPEC.md says little endian"
    out, offset = [], 0
    for count, code in re.findall(r"(\d*)([a-zA-Z])", st.format[1:]):
        if code == "s":
            out.append((offset, int(count or 1), f"bytes[{int(count or 1)}]"))
            offset += int(count or 1)
            continue
        for _ in range(int(count or 1)):
            size = struct.calcsize("<" + code)
            out.append((offset, size, _TYPE_NAMES[code]))
            offset += size
    return out


def _packed_samples() -> dict[str, bytes]:
    from dicomvault.formats.bkp import layout

    return {
        "HEADER": layout.pack_header(b"\xff" * 16, (1 << 62) + 12345),
        "FRAME": layout.pack_frame_header(2, 1, (1 << 40) + 7, (1 << 33) + 1, (1 << 35) + 3, (1 << 64) - 2),
        "FOOTER": layout.pack_footer((1 << 41) + 9, (1 << 20) + 48, (1 << 32) + 5, b"\xee" * 16),
    }


@pytest.mark.parametrize(("name", "size"), [("HEADER", 64), ("FRAME", 48), ("FOOTER", 64)])
def test_layout_tables_match_structs(name: str, size: int) -> None:
    from dicomvault.formats.bkp import layout

    st: struct.Struct = getattr(layout, name)
    rows = _table(f"layout:{name}")
    table = [(int(r[0]), int(r[1]), r[2]) for r in rows]
    assert table == _struct_layout(st)
    assert st.size == size == sum(r[1] for r in table)
    packed = _packed_samples()[name]
    assert len(packed) == size
    for offset, width, _typ, field, meaning in rows:
        if _unquote(field) == "magic":  # the bytes quoted in the table are the bytes the code writes
            quoted = re.search(r"`((?:[0-9a-f]{2} ?)+)`", meaning)
            assert quoted and bytes.fromhex(quoted[1]) == packed[int(offset):int(offset) + int(width)]
    reserved = [(int(r[0]), int(r[1])) for r in rows if r[4].startswith("Reserved")]
    assert reserved, "every structure has reserved fields"
    for offset, width in reserved:
        assert packed[offset:offset + width] == bytes(width), f"{name} reserved field at {offset}"


def test_no_quantity_is_narrower_than_64_bits() -> None:
    for name in ("HEADER", "FRAME", "FOOTER"):
        for offset, size, typ, field, _meaning in _table(f"layout:{name}"):
            if int(size) < 8 and not typ.startswith("bytes"):
                assert _unquote(field) in {"major", "minor", "flags", "type", "codec", "reserved"}, \
                    (name, offset, field)


def test_checksum_table_matches_packers() -> None:
    from dicomvault.formats.bkp import layout

    structure_name = {"header": "HEADER", "frame header": "FRAME", "footer": "FOOTER"}
    checked = 0
    for _name, structure, stored_at, covers in _table("checksums"):
        m = re.search(r"bytes (\d+)\.\.(\d+)", covers)
        if not m:
            continue
        packed = _packed_samples()[structure_name[structure]]
        a, b = (int(x) for x in stored_at.split(".."))
        assert b - a + 1 == 8
        stored = int.from_bytes(packed[a:b + 1], "little")
        covered = packed[int(m[1]):int(m[2]) + 1]
        assert stored == layout.xxh3(covered) == xxh3_64(covered)
        checked += 1
    assert checked == 3


def test_xxh3_test_vectors() -> None:
    import xxhash

    from dicomvault.formats.bkp import layout

    rows = _table("test-vectors:xxh3")
    assert len(rows) >= 2
    for inp, length, hexval, dec, le in rows:
        data = _vector_input(inp)
        assert len(data) == int(length)
        value = layout.xxh3(data)  # the code's own checksum function
        assert value == int(_unquote(hexval), 16) == int(_unquote(dec)), inp
        assert _hex_bytes(le) == value.to_bytes(8, "little") == struct.pack("<Q", value)
        assert xxhash.xxh3_64(data).digest() == value.to_bytes(8, "big")  # the pitfall SPEC.md warns about
        assert xxh3_64(data) == value  # the independent implementation agrees


def test_independent_xxh3_agrees_with_xxhash_on_every_length_class() -> None:
    import xxhash

    for n in [*range(0, 300), 1023, 1024, 1025, 2047, 2048, 2049, 5000, 70001]:
        data = hashlib.shake_256(str(n).encode()).digest(n) if n else b""
        assert xxh3_64(data) == xxhash.xxh3_64_intdigest(data), n


def test_zstd_content_checksum_test_vectors() -> None:
    """The checksum zstd ends each compressed frame with, as SPEC.md 7.3
    states it, and as the writer's own frames carry it."""
    import xxhash
    import zstandard

    from dicomvault.formats.bkp import writer
    from dicomvault.formats.bkp.layout import CODEC_ZSTD

    rows = _table("test-vectors:zstd-checksum")
    assert len(rows) >= 2
    for inp, length, hexval, last4 in rows:
        data = _vector_input(inp)
        assert len(data) == int(length)
        value = xxhash.xxh64_intdigest(data) & 0xFFFFFFFF
        assert value == int(_unquote(hexval), 16), inp
        frame = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=True).compress(data)
        assert _hex_bytes(last4) == frame[-4:] == value.to_bytes(4, "little"), inp
        codec, payload, _check = writer._compress(data, 3)
        if codec == CODEC_ZSTD:  # stored raw when zstd does not make it smaller (5.3)
            assert bytes(payload[-4:]) == _hex_bytes(last4), inp
    assert any(writer._compress(_vector_input(r[0]), 3)[0] == CODEC_ZSTD for r in rows)


def test_sha256_test_vectors() -> None:
    for inp, digest in _table("test-vectors:sha256"):
        assert _sha(_vector_input(inp)) == _unquote(digest)


def _struct_classes() -> dict[str, type]:
    from dicomvault.engine import types
    from dicomvault.formats.bkp import manifest

    names = ["Manifest", "FrameEntry", "Blob", "InstanceEntry", "AttachmentEntry", "Volume", "PageEntry"]
    out: dict[str, type] = {n: getattr(manifest, n) for n in names}
    for n in ["PatientRecord", "StudyRecord", "SeriesRecord", "InstanceRecord", "Attributes",
              "AttachmentRecord"]:
        out[n] = getattr(types, n)
    return out


def _type_name(t: msgspec.inspect.Type) -> str:
    mi = msgspec.inspect
    if isinstance(t, mi.IntType):
        return "int"
    if isinstance(t, mi.StrType):
        return "str"
    if isinstance(t, mi.BoolType):
        return "bool"
    if isinstance(t, mi.NoneType):
        return "nil"
    if isinstance(t, mi.UnionType):
        return " or ".join(_type_name(x) for x in t.types)
    if isinstance(t, mi.ListType):
        return f"array of {_type_name(t.item_type)}"
    if isinstance(t, mi.DictType):
        return f"map of {_type_name(t.key_type)} to {_type_name(t.value_type)}"
    if isinstance(t, mi.LiteralType):  # msgspec sorts the values; SPEC.md lists them in a natural order
        return "one of " + ", ".join(sorted(json.dumps(v) for v in t.values))
    if isinstance(t, mi.StructType):
        return t.cls.__name__
    raise AssertionError(f"SPEC.md has no name for {t!r}")


def _sorted_choices(text: str) -> str:
    if not text.startswith("one of "):
        return text
    return "one of " + ", ".join(sorted(v.strip() for v in text[len("one of "):].split(",")))


def _default_text(f: msgspec.inspect.Field) -> str:
    if f.required:
        return "required"
    if f.default_factory is not msgspec.NODEFAULT:
        return json.dumps(f.default_factory())
    if f.default is msgspec.NODEFAULT:  # msgspec.UNSET: the key is left out when absent
        return "absent"
    return "nil" if f.default is None else json.dumps(f.default)


def _reachable_structs(cls: type, seen: set[str]) -> set[str]:
    seen.add(cls.__name__)
    stack = [msgspec.inspect.type_info(cls)]
    while stack:
        t = stack.pop()
        if isinstance(t, msgspec.inspect.StructType):
            if t.cls.__name__ not in seen or t.cls is cls:
                seen.add(t.cls.__name__)
                stack += [f.type for f in t.fields]
        elif isinstance(t, msgspec.inspect.UnionType):
            stack += list(t.types)
        elif isinstance(t, msgspec.inspect.ListType):
            stack.append(t.item_type)
        elif isinstance(t, msgspec.inspect.DictType):
            stack += [t.key_type, t.value_type]
    return seen


def test_manifest_schema_tables_match_the_structs() -> None:
    classes = _struct_classes()
    markers = re.findall(r"<!-- schema:(\w+) (map|array) -->", _spec_text())
    assert {name for name, _form in markers} == _reachable_structs(classes["Manifest"], set()) == set(classes)
    for name, form in markers:
        cls = classes[name]
        info = msgspec.inspect.type_info(cls)
        assert isinstance(info, msgspec.inspect.StructType)
        assert info.array_like == (form == "array"), name
        rows = _table(f"schema:{name} {form}")
        assert [int(r[0]) for r in rows] == list(range(len(info.fields))), name
        assert [_unquote(r[1]) for r in rows] == [f.encode_name for f in info.fields], name
        assert [_sorted_choices(r[2]) for r in rows] == [_type_name(f.type) for f in info.fields], name
        assert [_unquote(r[3]) for r in rows] == [_default_text(f) for f in info.fields], name


def test_reference_figures_quoted_in_the_spec() -> None:
    from dicomvault.formats.bkp import reader, writer

    text = _spec_text()
    assert writer.FRAME_SIZE == 4_194_304 and "4 MiB (4,194,304 bytes)" in text
    assert reader.MAX_MANIFEST == 1 << 32 and "more than 2^32 bytes" in text
    assert "level 3" in text and writer.BkpWriter.__init__.__kwdefaults__["level"] == 3


# --------------------------------------------------------------------------- the annotated example


def test_annotated_example_is_consistent() -> None:
    size = int(re.search(r"\*\*(\d+)\*\*", "\n".join(_after_marker("example:size")[:3]))[1])
    h_at, header = _parse_dump(_code_block("example:header"))
    f_at, frame = _parse_dump(_code_block("example:frame"))
    t_at, footer = _parse_dump(_code_block("example:footer"))
    assert (h_at, len(header), f_at, len(frame), t_at, len(footer)) == (0, 64, 64, 48, size - 64, 64)

    magic, major, minor, flags, file_id, _created, reserved, check = S_HEADER.unpack(header)
    assert (magic, major, minor, flags, reserved) == (M_HEADER, 1, 0, 0, bytes(16))
    assert xxh3_64(header[:56]) == check
    fmagic, ftype, codec, freserved, seq, stored, raw, _pcheck, hcheck = S_FRAME.unpack(frame)
    assert (fmagic, ftype, codec, freserved, seq) == (M_FRAME, 1, 1, 0, 0)
    assert xxh3_64(frame[:40]) == hcheck
    moff, mlen, nframes, foot_id, foot_reserved, foot_check, foot_magic = S_FOOTER.unpack(footer)
    assert (nframes, foot_id, foot_reserved, foot_magic) == (1, file_id, bytes(8), M_FOOTER)
    assert xxh3_64(footer[:48]) == foot_check
    assert moff == 64 + 48 + stored and moff + mlen == size - 64  # contiguous, no gaps

    manifest = json.loads(_code_block("example:manifest"))
    assert manifest["frames"] == [[64, stored, raw, codec, 0]]
    source = (_pydicom_data() / "test_files" / "rtplan.dcm").read_bytes()
    (entry,) = manifest["instances"]
    assert entry["blob"] == [0, len(source)] and raw == len(source)
    assert entry["record"]["sha256"] == _sha(source) and entry["record"]["size"] == len(source)

    # the decoded view follows the schema, key for key and in the writer's order
    from dicomvault.formats.bkp.manifest import Manifest

    typed = msgspec.convert(manifest, Manifest)
    absent = [f.encode_name for f in msgspec.inspect.type_info(Manifest).fields  # type: ignore[union-attr]
              if not f.required and f.default is msgspec.NODEFAULT and f.default_factory is msgspec.NODEFAULT]
    assert list(manifest) == [f for f in Manifest.__struct_fields__ if f not in absent]
    assert msgspec.to_builtins(typed) == manifest


def test_the_tiny_cli_file_matches_the_example(tiny_bkp: Path) -> None:
    """The CLI still writes what section 14 shows (apart from random and time-dependent bytes)."""
    data = tiny_bkp.read_bytes()
    _at, frame = _parse_dump(_code_block("example:frame"))
    # stored length and checksums depend on the zstd library's version: compare the rest
    example, written = S_FRAME.unpack(frame), S_FRAME.unpack(data[64:112])
    assert example[:5] + example[6:7] == written[:5] + written[6:7]
    _at, footer = _parse_dump(_code_block("example:footer"))
    assert S_FOOTER.unpack(data[-64:])[2] == S_FOOTER.unpack(footer)[2] == 1
    with SpecReader(tiny_bkp) as r:
        (entry,) = r.instances()
        assert _sha(r.extract(entry["blob"])) == entry["record"]["sha256"]


# --------------------------------------------------------------------------- the independent reader


def test_independent_reader_lists_and_extracts_a_real_backup(real_bkp: tuple[Path, int, list[Path]]) -> None:
    path, stored, source_files = real_bkp
    source_sha = {_sha(p.read_bytes()): p for p in source_files}
    with SpecReader(path) as r:
        m = r.manifest
        assert m["format"] == "dicomvault-bkp" and (m["major"], m["minor"]) == (1, 1)  # section 9
        assert "pages" not in m and m["required_features"] == []  # fewer than 1,024 instances: no pages
        assert r.frames_read == [] and r.pages_read == []  # opening reads header, footer, manifest only
        tree = r.listing()
        assert r.frames_read == []  # listing reads no data frame
        assert sum(len(i) for st in tree.values() for se in st.values() for i in se.values()) == stored
        instances = r.instances()
        assert len(instances) == stored and len(m["attachments"]) == 1
        assert len(r.frames) >= 2, "the test data must span several frames"
        spanning = 0
        for entry in sorted(instances, key=lambda e: e["blob"][0]):
            rec, (offset, length) = entry["record"], entry["blob"]
            content = r.extract(entry["blob"])
            assert len(content) == length == rec["size"]
            assert _sha(content) == rec["sha256"], rec["sop_uid"]
            assert rec["sha256"] in source_sha, rec["sop_uid"]
            assert rec["origin"].startswith("file:")
            assert _sha(Path(rec["origin"][5:]).read_bytes()) == rec["sha256"]
            first = bisect.bisect_right(r.starts, offset) - 1
            last = bisect.bisect_right(r.starts, offset + length - 1) - 1
            spanning += first != last
        assert spanning >= 1, "at least one instance must cross a frame boundary"
        assert r.frames_read == sorted(set(r.frames_read)) == list(range(len(r.frames)))
        (att,) = m["attachments"]
        content = r.extract(att["blob"])
        assert _sha(content) == att["record"]["sha256"] == _sha(source_files[-1].read_bytes())
        assert att["record"]["size"] == len(content) and att["record"]["level"] == "study"


def test_extracting_one_blob_reads_only_its_frames(real_bkp: tuple[Path, int, list[Path]]) -> None:
    path, _stored, _files = real_bkp
    with SpecReader(path) as r:
        last_entry = max(r.instances(), key=lambda e: e["blob"][0])
        offset, length = last_entry["blob"]
        needed = [i for i, (_o, _s, raw, _c, so) in enumerate(r.frames)
                  if so < offset + length and so + raw > offset]
        assert _sha(r.extract(last_entry["blob"])) == last_entry["record"]["sha256"]
        assert r.frames_read == needed and 0 not in needed


def test_both_readers_list_the_same_backup(real_bkp: tuple[Path, int, list[Path]]) -> None:
    from dicomvault.formats.bkp.reader import BkpReader

    path, _stored, _files = real_bkp
    real = BkpReader(path)
    try:
        with SpecReader(path) as r:
            assert msgspec.to_builtins(real.manifest) == r.manifest
            assert real.stream_size == r.stream_size
            assert [msgspec.to_builtins(e) for e in real.iter_instances()] == r.instances()
    finally:
        real.close()


def _frame_chain(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, type, seq) of every frame from offset 64 up to the manifest frame, walked one after
    another (section 3): each frame header starts where the previous payload ends."""
    moff = S_FOOTER.unpack(data[-64:])[0]
    chain, at = [], 64
    while at < moff:
        magic, ftype, _codec, _r, seq, stored, _raw, _p, check = S_FRAME.unpack(data[at:at + 48])
        assert magic == M_FRAME and xxh3_64(data[at:at + 40]) == check, at
        chain.append((at, ftype, seq))
        at += 48 + stored
    assert at == moff, "the frames end where the manifest frame starts"
    return chain


def test_independent_reader_reads_a_paged_backup(paged_bkp: Path,
                                                 real_bkp: tuple[Path, int, list[Path]]) -> None:
    """A file with manifest pages from the real writer (sections 8.7, 10.4): listed, selectively
    read and extracted by the independent reader, which agrees with the real reader."""
    from dicomvault.formats.bkp.reader import BkpReader

    _unpaged, stored, source_files = real_bkp
    source_sha = {_sha(p.read_bytes()) for p in source_files}
    with SpecReader(_unpaged) as plain:
        plain_records = {e["record"]["sop_uid"]: e["record"] for e in plain.instances()}
    assert len(plain_records) == stored

    with SpecReader(paged_bkp) as r:
        m = r.manifest
        assert (m["major"], m["minor"]) == (1, 1) and "manifest-pages" in m["required_features"]
        assert r.frames_read == [] and r.pages_read == []  # opening reads no page (section 10.1)
        assert len(r.pages) >= 3, "the test file must have several pages"
        # the reference writer: full pages of PAGED_ENTRIES entries, the rest in the manifest (8.7)
        assert all(page[4] == PAGED_ENTRIES for page in r.pages)
        assert len(m["instances"]) == stored - PAGED_ENTRIES * len(r.pages) < PAGED_ENTRIES

        # the page frames stand among the data frames, each where the index says (8.7 rule 1)
        chain = _frame_chain(paged_bkp.read_bytes())
        assert [(o, s) for o, t, s in chain if t == 1] == [(fe[0], i) for i, fe in enumerate(r.frames)]
        assert [(o, s) for o, t, s in chain if t == FRAME_PAGE] == [
            (page[0], PAGE_SEQ_BASE + k) for k, page in enumerate(r.pages)]
        assert {t for _o, t, _s in chain} == {1, FRAME_PAGE}  # (where pages fall is the writer's choice)

        instances = r.instances()
        assert r.pages_read == list(range(len(r.pages))) and r.frames_read == []
        assert instances[:len(m["instances"])] == m["instances"]
        assert {e["record"]["sop_uid"]: e["record"] for e in instances} == plain_records
        assert len(instances) == stored
        # each page's `series` is its entries' series, once each, in order of first appearance
        for k, page in enumerate(r.pages):
            entries = r.read_page(k)
            assert page[5] == {e["record"]["series_uid"] for e in entries}
            assert m["pages"][k][5] == list(dict.fromkeys(e["record"]["series_uid"] for e in entries))
        tree = r.listing()
        assert sum(len(i) for st in tree.values() for se in st.values() for i in se.values()) == stored

        for entry in sorted(instances, key=lambda e: e["blob"][0]):
            rec = entry["record"]
            content = r.extract(entry["blob"])
            assert len(content) == entry["blob"][1] == rec["size"]
            assert _sha(content) == rec["sha256"] and rec["sha256"] in source_sha, rec["sop_uid"]
        assert r.frames_read == list(range(len(r.frames)))
        (att,) = m["attachments"]
        assert _sha(r.extract(att["blob"])) == att["record"]["sha256"] == _sha(source_files[-1].read_bytes())

    # selective reading: a series named by some pages, not all; only those pages are read
    pages_of: dict[str, list[int]] = {}
    with SpecReader(paged_bkp) as r:
        for k, page in enumerate(r.pages):
            for uid in page[5]:
                pages_of.setdefault(uid, []).append(k)
        in_manifest = {e["record"]["series_uid"] for e in r.manifest["instances"]}
        n_pages = len(r.pages)
    candidates = [uid for uid, ks in pages_of.items() if len(ks) < n_pages]
    assert candidates, "some series must be in only some of the pages"
    chosen = max(candidates,  # preferably in several pages and not in the manifest's own instances
                 key=lambda uid: (len(pages_of[uid]) > 1, uid not in in_manifest, len(pages_of[uid])))
    wanted = frozenset({chosen})
    expected = [e for e in instances if e["record"]["series_uid"] == chosen]
    assert expected
    with SpecReader(paged_bkp) as r:
        selected = r.instances(wanted)
        assert r.pages_read == pages_of[chosen] and len(r.pages_read) < n_pages
        assert selected == expected
        for entry in selected:
            assert _sha(r.extract(entry["blob"])) == entry["record"]["sha256"]
    a_page_series = next((uid for uid in pages_of if uid not in in_manifest), None)
    with SpecReader(paged_bkp) as r:  # a series that no page names: no page is read
        only_manifest = r.instances(frozenset(in_manifest - set(pages_of)) or frozenset({"1.2.3.999"}))
        assert r.pages_read == [] and all(e in m["instances"] for e in only_manifest)

    real = BkpReader(paged_bkp)
    try:
        with SpecReader(paged_bkp) as r:
            assert msgspec.to_builtins(real.manifest) == r.manifest
            assert real.stream_size == r.stream_size
            assert real.instance_count == len(instances)
            assert [msgspec.to_builtins(e) for e in real.iter_instances()] == instances
            assert [msgspec.to_builtins(e) for e in real.iter_instances(set(wanted))] == expected
            if a_page_series is not None:
                assert [msgspec.to_builtins(e) for e in real.iter_instances({a_page_series})] == \
                    r.instances(frozenset({a_page_series}))
    finally:
        real.close()
    shas = [e["record"]["sha256"] for e in instances]
    assert _read_all_spec(paged_bkp) == _read_all_real(paged_bkp) == shas


# --------------------------------------------------------------------------- damaged and crafted files


def _real_kind(exc: BaseException) -> str:
    from dicomvault import engine

    kinds = {engine.NotABackupError: "not a backup", engine.TruncatedError: "truncated",
             engine.ChecksumError: "checksum", engine.CorruptError: "corrupt",
             engine.UnsupportedVersionError: "unsupported version",
             engine.UnsupportedFeatureError: "unsupported feature"}
    return kinds.get(type(exc), f"unexpected {type(exc).__name__}: {exc}")


def _read_all_real(path: Path) -> list[str]:
    from dicomvault.formats.bkp.reader import BkpReader

    reader = BkpReader(path)
    try:
        out = []
        for entry in reader.iter_instances():  # the manifest's instances, then every page's
            with reader.open_blob(entry.blob) as fh:
                out.append(_sha(fh.read()))
        return out
    finally:
        reader.close()


def _read_all_spec(path: Path) -> list[str]:
    with SpecReader(path) as r:
        return [_sha(r.extract(e["blob"])) for e in r.iter_instances()]


def _outcome(read: Callable[[Path], list[str]], path: Path, kind_of: Callable[[BaseException], str]) -> tuple:
    try:
        return ("ok", read(path))
    except Exception as exc:
        return (kind_of(exc), str(exc))


def _reseal(data: bytearray, start: int, covered: int) -> None:
    """Recompute the XXH3-64 stored right after ``covered`` bytes from ``start``."""
    data[start + covered:start + covered + 8] = struct.pack("<Q", xxh3_64(bytes(data[start:start + covered])))


def _with_manifest(data: bytes, edit: Callable[[dict], object], *, header_minor: int | None = None) -> bytes:
    """The same file with its manifest replaced by ``edit(manifest)``, stored with codec 0."""
    moff, _mlen, nframes, file_id = S_FOOTER.unpack(data[-64:])[:4]
    _m, ftype, codec, _r, seq, stored, raw, _p, _h = S_FRAME.unpack(data[moff:moff + 48])
    payload = data[moff + 48:moff + 48 + stored]
    content = zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw) if codec else payload
    manifest = msgspec.msgpack.decode(content)
    new = msgspec.msgpack.encode(edit(manifest))
    head = bytearray(data[:moff])
    if header_minor is not None:
        head[10:12] = struct.pack("<H", header_minor)
        _reseal(head, 0, 56)
    frame = bytearray(S_FRAME.pack(M_FRAME, ftype, 0, 0, seq, len(new), len(new), xxh3_64(new), 0))
    _reseal(frame, 0, 40)
    footer = bytearray(S_FOOTER.pack(moff, 48 + len(new), nframes, file_id, bytes(8), 0, M_FOOTER))
    _reseal(footer, 0, 48)
    return bytes(head + frame + new + footer)


def _manifest_of(data: bytes) -> dict:
    moff = S_FOOTER.unpack(data[-64:])[0]
    _m, _t, codec, _r, _seq, stored, raw, _p, _h = S_FRAME.unpack(data[moff:moff + 48])
    payload = data[moff + 48:moff + 48 + stored]
    content = zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw) if codec else payload
    return msgspec.msgpack.decode(content)


def _with_page(data: bytes, k: int, edit: Callable[[list], object]) -> bytes:
    """The same file with the content of page ``k`` replaced by ``edit(entries)``, stored with codec 0;
    the frames after it move, and the footer, the frame index and the page index follow them."""
    pe = _manifest_of(data)["pages"][k]
    offset, stored = pe[0], pe[1]
    _m, ftype, codec, _r, seq, _s, raw, _p, _h = S_FRAME.unpack(data[offset:offset + 48])
    payload = data[offset + 48:offset + 48 + stored]
    content = zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw) if codec else payload
    new = msgspec.msgpack.encode(edit(msgspec.msgpack.decode(content)))
    frame = bytearray(S_FRAME.pack(M_FRAME, ftype, 0, 0, seq, len(new), len(new), xxh3_64(new), 0))
    _reseal(frame, 0, 40)
    shift = len(new) - stored
    out = bytearray(data[:offset] + frame + new + data[offset + 48 + stored:])
    moff = S_FOOTER.unpack(out[-64:])[0]
    out[-64:-56] = struct.pack("<Q", moff + shift)
    _reseal(out, len(out) - 64, 48)

    def follow(m: dict) -> dict:
        for entry in (*m["frames"], *m["pages"]):
            if entry[0] > offset:
                entry[0] += shift
        m["pages"][k][1:4] = [len(new), len(new), 0]
        return m

    return _with_manifest(bytes(out), follow)


def _page_mutations(data: bytes) -> dict[str, tuple[bytes, str]]:
    """Damaged and crafted variants of a file with manifest pages (sections 8.7, 10.1 step 20, 10.4)."""
    m = _manifest_of(data)
    pages, moff = m["pages"], S_FOOTER.unpack(data[-64:])[0]
    p0, p1 = pages[0][0], pages[1][0]

    def patch(at: int, value: bytes, reseal: tuple[int, int] | None = None) -> bytes:
        out = bytearray(data)
        out[at:at + len(value)] = value
        if reseal:
            _reseal(out, *reseal)
        return bytes(out)

    def flip(at: int) -> bytes:
        return patch(at, bytes([data[at] ^ 0x40]))

    def page_entry(k: int, field: int, value: object) -> Callable[[dict], dict]:
        def edit(m: dict) -> dict:
            m["pages"][k][field] = value
            return m
        return edit

    def features(names: list[str]) -> Callable[[dict], dict]:
        return lambda m: {**m, "required_features": names}

    def swap_pages(m: dict) -> dict:
        m["pages"][0], m["pages"][1] = m["pages"][1], m["pages"][0]
        return m

    def first_entry(edit: Callable[[dict], object]) -> Callable[[list], list]:
        def apply(entries: list) -> list:
            edit(entries[0])
            return entries
        return apply

    def page_raw(delta: int) -> bytes:
        """Page 0 rewritten with codec 0, then its `raw` (frame header and index) changed by ``delta``."""
        out = bytearray(_with_page(data, 0, lambda entries: entries))
        pe = _manifest_of(bytes(out))["pages"][0]
        out[pe[0] + 24:pe[0] + 32] = struct.pack("<Q", pe[2] + delta)
        _reseal(out, pe[0], 40)
        return _with_manifest(bytes(out), page_entry(0, 2, pe[2] + delta))

    other = [f for f in m["required_features"] if f != "manifest-pages"]
    return {
        "page payload flipped": (flip(p1 + 48 + pages[1][1] // 2), "checksum"),
        "page frame header flipped": (flip(p0 + 20), "checksum"),
        "page frame type 1": (patch(p0 + 4, b"\x01", (p0, 40)), "corrupt"),
        "page frame seq of page 5": (patch(p0 + 8, struct.pack("<Q", PAGE_SEQ_BASE + 5), (p0, 40)),
                                     "corrupt"),
        "page frame unknown codec": (patch(p0 + 5, b"\x07", (p0, 40)), "unsupported feature"),
        "page index count wrong": (_with_manifest(data, page_entry(0, 4, pages[0][4] + 1)), "corrupt"),
        "page index count zero": (_with_manifest(data, page_entry(0, 4, 0)), "corrupt"),
        "page index stored wrong": (_with_manifest(data, page_entry(0, 1, pages[0][1] - 1)), "corrupt"),
        "page index codec wrong": (_with_manifest(data, page_entry(0, 3, 1 - pages[0][3])), "corrupt"),
        "page index offset inside the header": (_with_manifest(data, page_entry(0, 0, 10)), "corrupt"),
        "page codec 0, raw differs from stored": (page_raw(1), "corrupt"),
        "page raw beyond the limit": (page_raw(1 << 33), "corrupt"),
        "page index points at a data frame": (_with_manifest(data, page_entry(0, 0, m["frames"][0][0])),
                                              "corrupt"),
        "page index points past the manifest": (_with_manifest(data, page_entry(0, 0, moff)), "corrupt"),
        "page index order swapped": (_with_manifest(data, swap_pages), "corrupt"),
        "page index misses a series": (_with_manifest(data, page_entry(0, 5, pages[0][5][1:])), "corrupt"),
        "feature removed, pages kept": (_with_manifest(data, features(other)), "corrupt"),
        "feature kept, pages removed": (
            _with_manifest(data, lambda m: {k: v for k, v in m.items() if k != "pages"}), "corrupt"),
        "feature kept, page index empty": (_with_manifest(data, lambda m: {**m, "pages": []}), "corrupt"),
        "page entry blob outside the stream": (
            _with_page(data, 0, first_entry(lambda e: e.__setitem__("blob", [0, 10**12]))), "corrupt"),
        "page entry size differs from its blob": (
            _with_page(data, 0, first_entry(lambda e: e["record"].__setitem__("size", e["blob"][1] + 1))),
            "corrupt"),
        "page entry series not in the index": (
            _with_page(data, 0, first_entry(lambda e: e["record"].__setitem__("series_uid", "1.2.3.999"))),
            "corrupt"),
        "page entry without sop_uid": (
            _with_page(data, 0, first_entry(lambda e: e["record"].pop("sop_uid"))), "corrupt"),
        "page holds one entry too few": (_with_page(data, 0, lambda entries: entries[:-1]), "corrupt"),
        "page is a map": (_with_page(data, 0, lambda entries: {"entries": entries}), "corrupt"),
        "page not MessagePack": (_with_page(data, 0, lambda entries: msgspec.Raw(b"\xc1")), "corrupt"),
    }


def _mutations(data: bytes) -> dict[str, tuple[bytes, str]]:
    size = len(data)
    moff = S_FOOTER.unpack(data[-64:])[0]

    def patch(at: int, value: bytes, reseal: tuple[int, int] | None = None) -> bytes:
        out = bytearray(data)
        out[at:at + len(value)] = value
        if reseal:
            _reseal(out, *reseal)
        return bytes(out)

    def flip(at: int) -> bytes:
        return patch(at, bytes([data[at] ^ 0x40]))

    def set_key(key: str, value: object) -> Callable[[dict], dict]:
        return lambda m: {**m, key: value}

    def drop_key(key: str) -> Callable[[dict], dict]:
        return lambda m: {k: v for k, v in m.items() if k != key}

    def blob_outside(m: dict) -> dict:
        m["instances"][0]["blob"] = [0, 10**9]
        return m

    footer = size - 64
    return {
        "empty file": (b"", "not a backup"),
        "shorter than the magic": (data[:5], "not a backup"),
        "bad header magic": (flip(1), "not a backup"),
        "header only": (data[:64], "truncated"),
        "cut in half": (data[:size // 2], "truncated"),
        "last byte missing": (data[:-1], "truncated"),
        "bytes after the footer": (data + bytes(16), "truncated"),
        "header byte flipped": (flip(20), "checksum"),
        "major version 2": (patch(8, b"\x02\x00", (0, 56)), "unsupported version"),
        "header flags set": (patch(12, b"\x01", (0, 56)), "corrupt"),
        "header reserved set": (patch(45, b"\x01", (0, 56)), "corrupt"),
        "footer byte flipped": (flip(footer + 3), "checksum"),
        "footer reserved set": (patch(footer + 41, b"\x01", (footer, 48)), "corrupt"),
        "footer file_id differs": (patch(footer + 24, b"\x00" * 16, (footer, 48)), "corrupt"),
        "footer points outside": (patch(footer, struct.pack("<Q", size), (footer, 48)), "corrupt"),
        "data frame bad magic": (patch(64, b"X"), "corrupt"),
        "data frame header flipped": (flip(64 + 20), "checksum"),
        "data frame reserved set": (patch(64 + 6, b"\x01", (64, 40)), "corrupt"),
        "data frame unknown codec": (patch(64 + 5, b"\x07", (64, 40)), "unsupported feature"),
        "data frame payload flipped": (flip(64 + 48 + 100), "checksum"),
        "manifest payload flipped": (flip(moff + 48 + 10), "checksum"),
        "manifest frame type 1": (patch(moff + 4, b"\x01", (moff, 40)), "corrupt"),
        "unknown required feature": (_with_manifest(data, set_key("required_features", ["x-future"])),
                                     "unsupported feature"),
        "manifest major 2": (_with_manifest(data, set_key("major", 2)), "unsupported version"),
        "manifest without writer": (_with_manifest(data, drop_key("writer")), "corrupt"),
        "frame index missing": (_with_manifest(data, set_key("frames", [])), "corrupt"),
        "blob outside the stream": (_with_manifest(data, blob_outside), "corrupt"),
        "unknown attribute level": (
            _with_manifest(data, set_key("attributes", [{"level": "galaxy", "uid": "1"}])), "corrupt"),
        "manifest not MessagePack": (_with_manifest(data, lambda m: msgspec.Raw(b"\xc1")), "corrupt"),
    }


def test_both_readers_report_the_same_error_class(tiny_bkp: Path, tmp_path: Path) -> None:
    data = tiny_bkp.read_bytes()
    assert _read_all_spec(tiny_bkp) == _read_all_real(tiny_bkp)
    for name, (damaged, expected) in _mutations(data).items():
        path = tmp_path / "damaged.bkp"
        path.write_bytes(damaged)
        spec = _outcome(_read_all_spec, path, lambda e: e.kind if isinstance(e, SpecError) else repr(e))
        real = _outcome(_read_all_real, path, _real_kind)
        assert (spec[0], real[0]) == (expected, expected), (name, spec, real)
        if name == "unknown required feature":
            assert "x-future" in spec[1] and "x-future" in real[1]
        if "major" in name:
            assert re.search(r"\b2\.\d", spec[1]) and re.search(r"\b2\.\d", real[1])  # the version named


def test_both_readers_report_the_same_error_class_on_pages(paged_bkp: Path, tmp_path: Path) -> None:
    data = paged_bkp.read_bytes()
    expected = _read_all_real(paged_bkp)
    assert _read_all_spec(paged_bkp) == expected
    rebuilt = tmp_path / "rebuilt.bkp"  # the page rewriter itself keeps the file valid
    rebuilt.write_bytes(_with_page(data, 1, lambda entries: entries))
    assert _read_all_spec(rebuilt) == _read_all_real(rebuilt) == expected
    for name, (damaged, kind) in _page_mutations(data).items():
        path = tmp_path / "damaged.bkp"
        path.write_bytes(damaged)
        spec = _outcome(_read_all_spec, path, lambda e: e.kind if isinstance(e, SpecError) else repr(e))
        real = _outcome(_read_all_real, path, _real_kind)
        assert (spec[0], real[0]) == (kind, kind), (name, spec, real)


def test_a_page_index_without_the_feature_is_corrupt_even_when_empty(tiny_bkp: Path, tmp_path: Path) -> None:
    path = tmp_path / "empty-pages.bkp"
    path.write_bytes(_with_manifest(tiny_bkp.read_bytes(), lambda m: {**m, "pages": []}))
    spec = _outcome(_read_all_spec, path, lambda e: e.kind if isinstance(e, SpecError) else repr(e))
    real = _outcome(_read_all_real, path, _real_kind)
    assert (spec[0], real[0]) == ("corrupt", "corrupt"), (spec, real)


def test_a_newer_minor_version_with_unknown_fields_reads(tiny_bkp: Path, tmp_path: Path) -> None:
    """SPEC.md section 9: unknown map keys, extra trailing array elements and optional features are
    ignored; any minor version of major 1 is read."""

    def newer(m: dict) -> dict:
        m["minor"] = 7
        m["x_new_index"] = {"pages": [1, 2, 3]}
        m["optional_features"] = ["x-later"]
        m["frames"] = [[*fe, "trailing", 42] for fe in m["frames"]]
        for entry in m["instances"]:
            entry["blob"] = [*entry["blob"], 99]
            entry["record"]["x_new_field"] = "ignored"
            entry["x_sidecar"] = None
        return m

    path = tmp_path / "newer.bkp"
    path.write_bytes(_with_manifest(tiny_bkp.read_bytes(), newer, header_minor=7))
    expected = [_sha((_pydicom_data() / "test_files" / "rtplan.dcm").read_bytes())]
    assert _read_all_spec(path) == expected
    assert _read_all_real(path) == expected
