"""Recognise DICOM by content and read what the catalog needs from the header.

Only the header is parsed (pydicom stops before the pixel data); the pixel
data is checked for truncation by looking at element lengths and seeking,
never by reading it.
"""
from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from typing import BinaryIO

import msgspec
import pydicom
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from ..engine.types import InstanceRecord, PatientRecord, SeriesRecord, StudyRecord, patient_key

MEDIA_DIRECTORY_CLASS = "1.2.840.10008.1.3.10"
PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
# Explicit-VR codes, to tell a raw data set from random bytes.
VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB",
       b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM",
       b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV"}
HEADER_TAGS = [
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyDate", "StudyTime",
    "AccessionNumber", "Modality", "StudyDescription", "SeriesDescription", "PatientName",
    "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
    "SeriesInstanceUID", "StudyID", "SeriesNumber", "InstanceNumber", "Rows", "Columns",
    "DirectoryRecordSequence",
]


class NotInstance(Exception):
    """Why a file is not taken as an instance. ``ignored`` marks files that
    are fine but simply not instances (a DICOMDIR)."""

    def __init__(self, reason: str, ignored: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.ignored = ignored


class Header(msgspec.Struct, frozen=True):
    patient: PatientRecord
    study: StudyRecord
    series: SeriesRecord
    instance: InstanceRecord


def looks_like_raw_dataset(head: bytes) -> bool:
    """A data set without preamble and meta: the first element must be a
    plausible group 0002/0008 tag, little or big endian, with a sane VR or
    length."""
    if len(head) < 8:
        return False
    for endian in "<>":
        group, elem = struct.unpack(endian + "HH", head[:4])
        if group not in (0x0002, 0x0008) or elem > 0x0FFF:
            continue
        if head[4:6] in VRS:  # explicit VR
            return True
        (length,) = struct.unpack(endian + "I", head[4:8])
        if endian == "<" and length < 1 << 16:  # implicit VR little endian
            return True
    return False


class _CutReader(io.BufferedReader):
    """A file that notes a read coming back shorter than asked but not empty
    (an element cut by the end of the file), which pydicom silently accepts.
    Reads of a raw data set's missing preamble (offsets 0 and 128) do not count."""

    cut = False

    def read(self, size: int | None = -1, /) -> bytes:
        pos = self.tell()
        data = super().read(size)
        if size is not None and 0 < len(data) < size and pos not in (0, 128):
            self.cut = True
        return data


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed value must not sink the whole file
        return ""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value).strip().replace("\0", "")


def _int(ds: pydicom.Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except Exception:
        return None


def _check_pixel_data(fh: BinaryIO, size: int, little: bool, implicit: bool) -> None:
    """Raise NotInstance when the pixel data element runs past the end."""
    start = fh.tell()
    head = fh.read(12)
    if len(head) < 8:
        return  # pixel data was the end of a header-only read (no pixels)
    e = "<" if little else ">"
    group, elem = struct.unpack(e + "HH", head[:4])
    if ((group << 16) | elem) not in PIXEL_TAGS:
        return
    if implicit:
        (length,) = struct.unpack(e + "I", head[4:8])
        pos = start + 8
    elif head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"):
        (length,) = struct.unpack(e + "I", head[8:12])
        pos = start + 12
    else:
        (length,) = struct.unpack(e + "H", head[6:8])
        pos = start + 8
    if length != 0xFFFFFFFF:
        if pos + length > size:
            raise NotInstance(f"truncated: pixel data needs {length} bytes, {size - pos} present")
        return
    # Encapsulated: walk the item headers by seeking, up to the delimiter.
    while True:
        fh.seek(pos)
        item = fh.read(8)
        if len(item) < 8:
            raise NotInstance("truncated: encapsulated pixel data has no sequence delimiter")
        group, elem, ilen = struct.unpack(e + "HHI", item)
        if (group, elem) == (0xFFFE, 0xE0DD):
            return
        if (group, elem) != (0xFFFE, 0xE000) or ilen == 0xFFFFFFFF:
            raise NotInstance("corrupt encapsulated pixel data (bad item header)")
        pos += 8 + ilen
        if pos > size:
            raise NotInstance("truncated: a pixel data fragment runs past the end of the file")


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse one file's header; raise NotInstance with a reason otherwise."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise NotInstance(f"cannot read: {exc.strerror}") from exc
    if size == 0:
        raise NotInstance("empty file")
    try:
        with _CutReader(io.FileIO(path, "rb")) as fh:
            head = fh.read(140)
            part10 = len(head) >= 132 and head[128:132] == b"DICM"
            if not part10 and not looks_like_raw_dataset(head):
                raise NotInstance("not DICOM")
            fh.seek(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    ds = pydicom.dcmread(fh, force=not part10, stop_before_pixels=True,
                                         specific_tags=HEADER_TAGS)
                except (InvalidDicomError, BytesLengthException, EOFError, ValueError, struct.error,
                        NotImplementedError, KeyError, OverflowError, TypeError, zlib.error) as exc:
                    raise NotInstance(f"not readable as DICOM ({type(exc).__name__}: "
                                      f"{str(exc)[:120]})") from exc
                if fh.cut or fh.tell() > size:
                    raise NotInstance("truncated: the header ends inside a data element")
                meta = getattr(ds, "file_meta", None) or pydicom.Dataset()
                sop_class = _text(ds, "SOPClassUID") or _text(meta, "MediaStorageSOPClassUID")
                if sop_class == MEDIA_DIRECTORY_CLASS or "DirectoryRecordSequence" in ds:
                    raise NotInstance("DICOMDIR (a media directory, not an instance)", ignored=True)
                implicit, little = ds.original_encoding
                ts = _text(meta, "TransferSyntaxUID")
                if not ts:
                    ts = (ImplicitVRLittleEndian if implicit else
                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
                if ts != DeflatedExplicitVRLittleEndian and little is not None:
                    # A complete data set that ends before any pixel data is kept as it is (pydicom
                    # ships such headers, e.g. its charset files); a cut inside an element is caught above.
                    _check_pixel_data(fh, size, bool(little), bool(implicit))
                sop_uid = _text(ds, "SOPInstanceUID") or _text(meta, "MediaStorageSOPInstanceUID")
                study_uid = _text(ds, "StudyInstanceUID")
                series_uid = _text(ds, "SeriesInstanceUID")
                missing = [n for n, v in (("SOP Instance UID", sop_uid), ("Study Instance UID", study_uid),
                                          ("Series Instance UID", series_uid)) if not v]
                if missing:
                    raise NotInstance("missing " + ", ".join(missing))
                pid, issuer = _text(ds, "PatientID"), _text(ds, "IssuerOfPatientID")
                name, birth = _text(ds, "PatientName"), _text(ds, "PatientBirthDate")
                patient = PatientRecord(key=patient_key(pid, issuer, name, birth), patient_id=pid,
                                        issuer=issuer, name=name, birth_date=birth,
                                        sex=_text(ds, "PatientSex"))
                study = StudyRecord(study_uid=study_uid, patient_key=patient.key,
                                    date=_text(ds, "StudyDate"), time=_text(ds, "StudyTime"),
                                    study_id=_text(ds, "StudyID"), accession=_text(ds, "AccessionNumber"),
                                    description=_text(ds, "StudyDescription"))
                series = SeriesRecord(series_uid=series_uid, study_uid=study_uid,
                                      modality=_text(ds, "Modality"), number=_int(ds, "SeriesNumber"),
                                      description=_text(ds, "SeriesDescription"))
                instance = InstanceRecord(sop_uid=sop_uid, series_uid=series_uid, sop_class_uid=sop_class,
                                          transfer_syntax=ts, number=_int(ds, "InstanceNumber"), size=size)
                return Header(patient, study, series, instance)
    except OSError as exc:
        raise NotInstance(f"cannot read: {exc.strerror or exc}") from exc
