"""The bytes we send: where the data set starts in a stored file (after the
Part 10 preamble and file meta), and the lossless conversion to an
uncompressed transfer syntax when a server takes nothing else."""
from __future__ import annotations

import struct
import warnings
from typing import BinaryIO

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")  # explicit, implicit VR little endian
NATIVE = {*UNCOMPRESSED, "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}


class NotSendable(Exception):
    """The file cannot be sent as it is (no data set, cannot be converted)."""


HEAD_WINDOW = 1 << 16


class Rest:
    """The data set as a stream: what is left of the head window, then the file."""

    def __init__(self, head: bytes, offset: int, fh: BinaryIO) -> None:
        self.head = memoryview(head)[offset:]
        self.fh = fh

    def read(self, n: int) -> bytes | memoryview:
        if self.head:
            out, self.head = self.head[:n], self.head[n:]
            return out
        return self.fh.read(n)


def read_head(fh: BinaryIO) -> tuple[bytes, int, dict[int, str]]:
    """Reads (forward only: .bkp streams cannot seek) the first bytes of a
    stored file; returns them, the offset of the data set in them (after the
    Part 10 preamble and file meta; 0 for a raw data set) and the file meta
    UIDs by element (0x0002 SOP class, 0x0003 SOP instance, 0x0010 transfer syntax)."""
    parts = []
    got = 0
    while got < HEAD_WINDOW:
        chunk = fh.read(HEAD_WINDOW - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    head = b"".join(parts)
    pos = 132 if head[128:132] == b"DICM" else 0
    meta: dict[int, str] = {}
    while pos + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            break
        vr = head[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            length = struct.unpack_from("<I", head, pos + 8)[0]
            start = pos + 12
        else:
            length = struct.unpack_from("<H", head, pos + 6)[0]
            start = pos + 8
        if start + length > len(head):
            raise NotSendable("the file meta information is truncated (or longer than 64 KiB)")
        if element in (0x0002, 0x0003, 0x0010):
            meta[element] = head[start:start + length].decode("ascii", "replace").rstrip("\0 ")
        pos = start + length
    return head, pos, meta


def dataset_offset(fh: BinaryIO) -> tuple[int, dict[int, str]]:
    """Offset of the data set in a seekable file and its meta UIDs; leaves
    ``fh`` at the offset."""
    _head, offset, meta = read_head(fh)
    fh.seek(offset)
    return offset, meta


def converted(fh: BinaryIO, transfer_syntax: str) -> bytes:
    """The data set of the whole file ``fh`` re-encoded losslessly in ``transfer_syntax`` (explicit or
    implicit VR little endian): compressed pixel data is decoded with
    pydicom's decoders; nothing is ever re-compressed."""
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.uid import UID

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(fh, force=True)
            source = UID(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in ds.file_meta else None
            if source is not None and source.is_compressed:
                # lossless: the decoded pixel values, never re-encoded; the same SOP Instance UID
                ds.decompress(generate_instance_uid=False)
            elif source is not None and not source.is_little_endian and "PixelData" in ds \
                    and int(ds.get("BitsAllocated", 8)) > 8:
                raise NotSendable("big endian pixel data wider than 8 bits is not converted")
            out = DicomBytesIO()
            out.is_little_endian = True
            out.is_implicit_VR = transfer_syntax == UNCOMPRESSED[1]
            write_dataset(out, ds)
        except Exception as exc:  # a decoder missing or failing, a broken data set
            raise NotSendable(f"could not convert to {UID(transfer_syntax).name}: "
                              f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from exc
    data: bytes = out.getvalue()
    return data
