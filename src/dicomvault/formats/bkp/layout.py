"""Byte layout of a .bkp file (SPEC.md, section "Layout"). Little endian,
fixed-width 64-bit offsets and lengths everywhere.

    header (64 bytes) | frame | frame | ... | manifest frame | footer (64 bytes)
"""
from __future__ import annotations

import os
import struct
from typing import NamedTuple

import xxhash

from dicomvault.engine import (
    ChecksumError,
    CorruptError,
    NotABackupError,
    TruncatedError,
    UnsupportedFeatureError,
    UnsupportedVersionError,
)

MAJOR = 1
MINOR = 1  # the newest minor version this release reads and writes (1.1: manifest pages)

HEADER_MAGIC = b"\x89DVBKP\r\n"  # high bit, CR LF: catches 7-bit and text-mode damage
FRAME_MAGIC = b"DVFR"
FOOTER_MAGIC = b"DVBKPEND"

HEADER = struct.Struct("<8sHHI16sq16sQ")  # magic major minor flags file_id created reserved xxh3
FRAME = struct.Struct("<4sBBHQQQQQ")  # magic type codec reserved seq stored raw payload_xxh3 hdr_xxh3
FOOTER = struct.Struct("<QQQ16s8sQ8s")  # manifest_off manifest_len frames file_id reserved xxh3 magic
assert HEADER.size == 64 and FRAME.size == 48 and FOOTER.size == 64

FRAME_DATA = 1
FRAME_MANIFEST = 2
FRAME_KEY = 3  # key parameters of an encrypted file, right after the header (SPEC.md section 17)
FRAME_PAGE = 4  # a page of the manifest's instance entries (1.1, SPEC.md section "Manifest pages")
PAGE_SEQ_BASE = 1 << 63  # page frame k has seq PAGE_SEQ_BASE + k: never a data frame's seq (nonces)
CODEC_NONE = 0
CODEC_ZSTD = 1
KNOWN_CODECS = (CODEC_NONE, CODEC_ZSTD)

def is_critical_frame_type(ftype: int) -> bool:
    """Frame types 0-127 are critical: a sequential reader (verify, salvage)
    that does not know one must stop. Types 128-255 may be skipped: later
    minor versions add such frames for things older readers can ignore."""
    return ftype < 0x80

# Header ``flags``: required-feature bits. A reader refuses a bit it does not know.
FLAG_ENCRYPTED = 1 << 0
KNOWN_FLAGS = FLAG_ENCRYPTED


class Header(NamedTuple):
    major: int
    minor: int
    flags: int
    file_id: bytes
    created: int


def xxh3(data: bytes | bytearray | memoryview) -> int:
    """XXH3-64 with seed 0, as an unsigned integer (stored little endian)."""
    return xxhash.xxh3_64_intdigest(data)


def pack_header(file_id: bytes, created: int, flags: int = 0, minor: int = MINOR) -> bytes:
    """``minor``: the version the writer commits to before it knows the file's
    content (SPEC.md section 9); tests write older ones."""
    body = HEADER.pack(HEADER_MAGIC, MAJOR, minor, flags, file_id, created, bytes(16), 0)[:56]
    return body + struct.pack("<Q", xxh3(body))


def unpack_header(raw: bytes) -> tuple[int, int, bytes, int]:
    """Returns (major, minor, file_id, created); raises the format's errors.
    Use :func:`parse_header` to learn the feature flags (encryption) too."""
    h = parse_header(raw)
    return h.major, h.minor, h.file_id, h.created


def header_flags(raw: bytes) -> int:
    """The header's ``flags`` word, unchecked (0 when ``raw`` is not a header):
    enough to learn whether a passphrase will be needed, before opening."""
    if len(raw) < HEADER.size or raw[:8] != HEADER_MAGIC:
        return 0
    return int(HEADER.unpack(raw[:HEADER.size])[3])


def file_is_encrypted(path: str | os.PathLike[str]) -> bool:
    try:
        with open(path, "rb") as fh:
            return bool(header_flags(fh.read(HEADER.size)) & FLAG_ENCRYPTED)
    except OSError:
        return False  # opening it for real says why


def parse_header(raw: bytes) -> Header:
    """The header, checked; raises the format's errors."""
    if len(raw) < 8 or raw[:8] != HEADER_MAGIC:
        raise NotABackupError("not a .bkp file (the header magic is missing)")
    if len(raw) < HEADER.size:
        raise TruncatedError("truncated .bkp file: the header is incomplete")
    _magic, major, minor, flags, file_id, created, reserved, check = HEADER.unpack(raw[:64])
    if xxh3(raw[:56]) != check:
        raise ChecksumError("the .bkp header checksum does not match (damaged header)")
    if major != MAJOR:
        raise UnsupportedVersionError(f"this .bkp file has format version {major}.{minor}; this "
                                      f"release reads major version {MAJOR} only: upgrade dicomvault")
    if reserved != bytes(16):
        raise CorruptError("reserved header fields are not zero")
    unknown = [bit for bit in range(32) if flags & ~KNOWN_FLAGS & (1 << bit)]
    if unknown:
        raise UnsupportedFeatureError("this .bkp file needs feature(s) this release does not implement: "
                                      + ", ".join(f"header flag bit {bit}" for bit in unknown))
    return Header(major, minor, flags, file_id, created)


def pack_frame_header(ftype: int, codec: int, seq: int, stored: int, raw: int, payload_xxh3: int) -> bytes:
    body = FRAME.pack(FRAME_MAGIC, ftype, codec, 0, seq, stored, raw, payload_xxh3, 0)[:40]
    return body + struct.pack("<Q", xxh3(body))


def unpack_frame_header(raw: bytes, where: int) -> tuple[int, int, int, int, int, int]:
    """Returns (type, codec, seq, stored, raw, payload_xxh3)."""
    if len(raw) < FRAME.size:
        raise TruncatedError(f"truncated .bkp file: frame header at offset {where} is incomplete")
    magic, ftype, codec, reserved, seq, stored, rawlen, pcheck, hcheck = FRAME.unpack(raw)
    if magic != FRAME_MAGIC:
        raise CorruptError(f"no frame at offset {where} (bad frame magic)")
    if xxh3(raw[:40]) != hcheck:
        raise ChecksumError(f"frame header at offset {where} is damaged (checksum mismatch)")
    if reserved != 0:
        raise CorruptError(f"frame at offset {where}: reserved field is not zero")
    if codec not in KNOWN_CODECS:
        raise UnsupportedFeatureError(f"frame at offset {where} uses codec {codec}, unknown to this release")
    return ftype, codec, seq, stored, rawlen, pcheck


def pack_footer(manifest_offset: int, manifest_length: int, frames: int, file_id: bytes) -> bytes:
    body = FOOTER.pack(manifest_offset, manifest_length, frames, file_id, bytes(8), 0, FOOTER_MAGIC)[:48]
    return body + struct.pack("<Q", xxh3(body)) + FOOTER_MAGIC


def unpack_footer(raw: bytes) -> tuple[int, int, int, bytes]:
    """Returns (manifest_offset, manifest_length, data_frames, file_id)."""
    if len(raw) < FOOTER.size or raw[-8:] != FOOTER_MAGIC:
        raise TruncatedError("truncated or unfinished .bkp file: the footer is missing")
    moff, mlen, frames, file_id, reserved, check, _magic = FOOTER.unpack(raw)
    if xxh3(raw[:48]) != check:
        raise ChecksumError("the .bkp footer checksum does not match (damaged footer)")
    if reserved != bytes(8):
        raise CorruptError("reserved footer fields are not zero")
    return moff, mlen, frames, file_id
