"""Lossless conversion to Explicit VR Little Endian, for DICOMDIR media.

The general-purpose media profiles want Explicit VR Little Endian files.
Implicit VR Little Endian, Explicit VR Big Endian and Deflated Explicit VR
Little Endian are rewritten losslessly: values are decoded and re-encoded,
and the raw words of OW/OF/OL/OD/OV elements (Pixel Data among them) of
big-endian files are byte-swapped. A data set stored without the Part 10
preamble and file meta (a "raw" data set, which import-dicom accepts) is
rewritten the same way, so that every file on the media is a Part 10 file.
Compressed (encapsulated) transfer syntaxes are kept byte for byte (see
README, "Export DICOM").
"""
from __future__ import annotations

from array import array
from typing import BinaryIO

from pydicom import Dataset, dcmread
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
CONVERTED = {IMPLICIT_LE, EXPLICIT_BE, DEFLATED_LE}
_SWAP = {"OW": "H", "OF": "I", "OL": "I", "OD": "Q", "OV": "Q"}


def needs_conversion(transfer_syntax: str, head: bytes = b"\x00" * 128 + b"DICM") -> bool:
    """Whether a file for DICOM media must be rewritten: its transfer syntax,
    or no Part 10 header (``head``: the file's first 132 bytes)."""
    return transfer_syntax in CONVERTED or head[128:132] != b"DICM"


def _swap_words(ds: Dataset) -> None:
    for elem in ds.iterall():
        code = _SWAP.get(str(elem.VR))
        if code and isinstance(elem.value, bytes) and elem.value:
            words = array(code)
            if len(elem.value) % words.itemsize:
                continue  # not whole words: leave as is rather than guess
            words.frombytes(elem.value)
            words.byteswap()
            elem.value = words.tobytes()


def to_explicit_le(src: BinaryIO, dst: BinaryIO, declared: str = "") -> str:
    """Rewrite the Part 10 file (or raw data set) in ``src`` as an Explicit VR
    Little Endian Part 10 file into ``dst``; returns the original transfer
    syntax (``declared``, the source's record of it, when the file has no
    file meta)."""
    ds = dcmread(src, force=True)
    original = str(ds.file_meta.get("TransferSyntaxUID", "")) or declared
    if original == EXPLICIT_BE:
        _swap_words(ds)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dcmwrite(dst, ds, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return original
