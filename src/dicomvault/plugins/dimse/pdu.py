"""DICOM upper layer PDUs (PS3.8 section 9.3): encoding what we send, decoding
what a server answers. Only what a C-STORE SCU needs."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1516.1"  # dicomvault's implementation class
IMPLEMENTATION_VERSION = "DICOMVAULT_01"

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07

_HEAD = struct.Struct(">BxI")
_ITEM = struct.Struct(">BxH")
PDV_HEAD = struct.Struct(">IBB")  # item length, context ID, message control header


def _uid(uid: str) -> bytes:
    return uid.encode("ascii")


def _item(kind: int, body: bytes) -> bytes:
    return _ITEM.pack(kind, len(body)) + body


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16)[:16]


def associate_rq(called: str, calling: str, contexts: list[tuple[int, str, list[str]]],
                 max_pdu: int) -> bytes:
    """An A-ASSOCIATE-RQ proposing ``contexts`` as (ID, abstract syntax, transfer syntaxes)."""
    body = [struct.pack(">HH", 1, 0), _ae(called), _ae(calling), bytes(32),
            _item(0x10, _uid(APPLICATION_CONTEXT))]
    for cid, abstract, syntaxes in contexts:
        sub = _item(0x30, _uid(abstract)) + b"".join(_item(0x40, _uid(ts)) for ts in syntaxes)
        body.append(_item(0x20, struct.pack(">Bxxx", cid) + sub))
    user = (_item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, _uid(IMPLEMENTATION_CLASS_UID))
            + _item(0x55, IMPLEMENTATION_VERSION.encode("ascii")))
    body.append(_item(0x50, user))
    data = b"".join(body)
    return _HEAD.pack(A_ASSOCIATE_RQ, len(data)) + data


@dataclass
class Accepted:
    """What an A-ASSOCIATE-AC says: per context ID the result and the transfer
    syntax chosen, and the largest PDU the server takes (0: no limit)."""

    results: dict[int, tuple[int, str]] = field(default_factory=dict)
    max_pdu: int = 0


def parse_associate_ac(body: bytes) -> Accepted:
    acc = Accepted()
    pos = 68  # protocol version, reserved, called/calling AE (echoed), reserved
    while pos + 4 <= len(body):
        kind, length = _ITEM.unpack_from(body, pos)
        value = body[pos + 4:pos + 4 + length]
        pos += 4 + length
        if kind == 0x21:
            cid, result = value[0], value[2]
            ts = ""
            sub = 4
            while sub + 4 <= len(value):
                skind, slen = _ITEM.unpack_from(value, sub)
                if skind == 0x40:
                    ts = value[sub + 4:sub + 4 + slen].decode("ascii", "replace").rstrip("\0 ")
                sub += 4 + slen
            acc.results[cid] = (result, ts)
        elif kind == 0x50:
            sub = 0
            while sub + 4 <= len(value):
                skind, slen = _ITEM.unpack_from(value, sub)
                if skind == 0x51 and slen == 4:
                    acc.max_pdu = struct.unpack_from(">I", value, sub + 4)[0]
                sub += 4 + slen
    return acc


CONTEXT_RESULTS = {0: "acceptance", 1: "user-rejection", 2: "no-reason (provider rejection)",
                   3: "abstract-syntax-not-supported", 4: "transfer-syntaxes-not-supported"}

_RJ_REASONS = {
    (1, 1): "no reason given", (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized", (1, 7): "called AE title not recognized",
    (2, 1): "no reason given", (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion", (3, 2): "local limit exceeded",
}


def describe_reject(body: bytes) -> tuple[str, bool]:
    """Text for an A-ASSOCIATE-RJ, and whether it is permanent."""
    result, source, reason = body[1], body[2], body[3]
    text = _RJ_REASONS.get((source, reason), f"reason {reason}")
    who = {1: "the server", 2: "the server's ACSE", 3: "the server's presentation layer"}.get(source, "")
    kind = "permanently" if result == 1 else "transiently"
    return f"association rejected {kind} by {who}: {text}", result == 1


_ABORT_REASONS = {0: "no reason given", 1: "unrecognized PDU", 2: "unexpected PDU",
                  4: "unrecognized PDU parameter", 5: "unexpected PDU parameter",
                  6: "invalid PDU parameter value"}


def describe_abort(body: bytes) -> str:
    source, reason = (body[2], body[3]) if len(body) >= 4 else (0, 0)
    if source == 2:
        return f"association aborted by the server's DICOM layer ({_ABORT_REASONS.get(reason, reason)})"
    return "association aborted by the server"


def release_rq() -> bytes:
    return _HEAD.pack(A_RELEASE_RQ, 4) + bytes(4)


def abort() -> bytes:
    return _HEAD.pack(A_ABORT, 4) + bytes(4)


def pdata_head(cid: int, control: int, length: int) -> bytes:
    """Header of a P-DATA-TF PDU holding one PDV of ``length`` bytes."""
    return _HEAD.pack(P_DATA_TF, length + 6) + PDV_HEAD.pack(length + 2, cid, control)


def iter_pdvs(body: bytes) -> list[tuple[int, int, bytes]]:
    """The PDVs of a P-DATA-TF body as (context ID, control header, data)."""
    out = []
    pos = 0
    while pos + 6 <= len(body):
        length, cid, control = PDV_HEAD.unpack_from(body, pos)
        out.append((cid, control, body[pos + 6:pos + 4 + length]))
        pos += 4 + length
    return out


HEAD = _HEAD
