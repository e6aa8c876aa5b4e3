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


def dataset_offset(fh: BinaryIO) -> tuple[int, dict[int, str]]:
    """Offset of the data set in ``fh`` and the file meta UIDs by element
    (0x0002: SOP class, 0x0003: SOP instance, 0x0010: transfer syntax).
    Leaves ``fh`` at the offset. A raw data set (no meta) starts at 0."""
    head = fh.read(132)
    pos = 132 if head[128:132] == b"DICM" else 0
    meta: dict[int, str] = {}
    fh.seek(pos)
    while True:
        tag = fh.read(6)
        if len(tag) < 6:
            break
        group, element = struct.unpack("<HH", tag[:4])
        if group != 0x0002:
            break
        vr = tag[4:6]
        if vr in _LONG_VRS:
            length = struct.unpack("<xxI", fh.read(6))[0]
            hdr = 12
        else:
            length = struct.unpack("<H", fh.read(2))[0]
            hdr = 8
        value = fh.read(length)
        if len(value) < length:
            raise NotSendable("the file meta information is truncated")
        if element in (0x0002, 0x0003, 0x0010):
            meta[element] = value.decode("ascii", "replace").rstrip("\0 ")
        pos += hdr + length
    fh.seek(pos)
    return pos, meta


def converted(fh: BinaryIO, transfer_syntax: str) -> bytes:
    """The data set re-encoded losslessly in ``transfer_syntax`` (explicit or
    implicit VR little endian): compressed pixel data is decoded with
    pydicom's decoders; nothing is ever re-compressed."""
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.uid import UID

    fh.seek(0)
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
