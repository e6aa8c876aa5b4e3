"""DIMSE C-STORE commands (PS3.7 section 9.3.1): the request we send and the
response we read, as implicit VR little endian command sets."""
from __future__ import annotations

import struct

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
_EL = struct.Struct("<HHI")


def _el(element: int, value: bytes) -> bytes:
    return _EL.pack(0x0000, element, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def c_store_rq(message_id: int, sop_class: str, sop_instance: str, priority: int = 0) -> bytes:
    body = b"".join((
        _el(0x0002, _ui(sop_class)),
        _el(0x0100, struct.pack("<H", C_STORE_RQ)),
        _el(0x0110, struct.pack("<H", message_id & 0xFFFF)),
        _el(0x0700, struct.pack("<H", priority)),
        _el(0x0800, struct.pack("<H", 0x0000)),  # a data set follows
        _el(0x1000, _ui(sop_instance)),
    ))
    return _el(0x0000, struct.pack("<I", len(body))) + body


def parse_command(data: bytes) -> dict[int, bytes]:
    """Element number -> raw value of a group 0000 command set."""
    out = {}
    pos = 0
    while pos + 8 <= len(data):
        _group, element, length = _EL.unpack_from(data, pos)
        out[element] = data[pos + 8:pos + 8 + length]
        pos += 8 + length
    return out


def us(cmd: dict[int, bytes], element: int) -> int | None:
    raw = cmd.get(element)
    return struct.unpack("<H", raw[:2])[0] if raw and len(raw) >= 2 else None


def text(cmd: dict[int, bytes], element: int) -> str:
    return cmd.get(element, b"").decode("ascii", "replace").rstrip("\0 ")
