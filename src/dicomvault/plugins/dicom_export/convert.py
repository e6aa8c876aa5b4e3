"""Lossless conversion to Explicit VR Little Endian, for DICOMDIR media.

The general-purpose media profiles want Explicit VR Little Endian files.
Implicit VR Little Endian, Explicit VR Big Endian and Deflated Explicit VR
Little Endian are rewritten losslessly: values are decoded and re-encoded,
and the raw words of OW/OF/OL/OD/OV elements (Pixel Data among them) of
big-endian files are byte-swapped. Compressed (encapsulated) transfer
syntaxes are kept byte for byte (see README, "DICOMDIR").
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


def needs_conversion(transfer_syntax: str) -> bool:
    return transfer_syntax in CONVERTED


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


def to_explicit_le(src: BinaryIO, dst: BinaryIO) -> str:
    """Rewrite the Part 10 file in ``src`` as Explicit VR Little Endian into
    ``dst``; returns the original transfer syntax."""
    ds = dcmread(src, force=True)
    original = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if original == EXPLICIT_BE:
        _swap_words(ds)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dcmwrite(dst, ds, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return original
