"""The DICOMDIR: built on pydicom's FileSet, around three of its gaps.

pydicom's ``FileSet.add`` writes every instance to a staging copy with
``save_as`` (not byte-identical, and slow) and later copies it again under
its own File IDs; ``RecordNode.add`` finds siblings by a linear scan. We
need byte-identical files under *our* File IDs, so we use FileSet for what
it does well -- making the directory records (``_recordify``: PATIENT,
STUDY, SERIES and the right leaf type for the SOP Class) -- and link the
record tree ourselves, with dictionaries. Later IMAGE records of a series
are made from the source's records without a header, and the DICOMDIR is
encoded here (each record once; ``_write_dicomdir`` encodes each twice),
byte for byte as pydicom's ``_write_dicomdir`` would (a test checks).

Record keys the standard makes Type 1 but the instance lacks are filled by
one rule (README, "Export DICOM"), and each filling is reported as a warning:

* PatientID: ``DV`` + 14 hex digits of the patient's identity (patient key);
* StudyDate / StudyTime: the first of Series, Acquisition, Content date/time,
  else ``19000101`` / ``000000``;
* StudyID: ``DV`` + 8 hex digits of the Study Instance UID;
* Modality: ``OT``; SeriesNumber: ``0``;
* InstanceNumber: the instance's position in its series in this export;
* several values in a single-valued record key are joined by `` / ``;
* old ACR-NEMA forms ``1996.10.29`` / ``15:18:59`` become ``19961029`` / ``151859``.
"""
from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import Dataset
from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VM
from pydicom.filebase import DicomBytesIO
from pydicom.fileset import (
    _FOUR_LEVEL_SOP_CLASSES,
    _SINGLE_LEVEL_SOP_CLASSES,
    FileInstance,
    FileSet,
    RecordNode,
)
from pydicom.filewriter import write_data_element, write_dataset, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from . import naming

_DATES = ("SeriesDate", "AcquisitionDate", "ContentDate")
_TIMES = ("SeriesTime", "AcquisitionTime", "ContentTime")


def _empty(ds: Dataset, keyword: str) -> bool:
    return keyword not in ds or ds[keyword].VM == 0 or str(ds[keyword].value).strip() == ""


def fill_record_keys(ds: Dataset, patient_key: str, position: int) -> list[str]:
    """Fill missing Type 1 record keys in ``ds`` (a header copy, never the
    exported file); returns the names of what was filled."""
    filled = []

    def put(keyword: str, value: Any) -> None:
        setattr(ds, keyword, value)
        filled.append(keyword)

    for keyword, strip in (("StudyDate", "."), ("StudyTime", ":")):  # ACR-NEMA forms
        value = str(ds.get(keyword, "") or "")
        if strip in value:
            put(keyword, value.replace(strip, ""))
    if _empty(ds, "PatientID"):
        put("PatientID", "DV" + hashlib.sha256(patient_key.encode()).hexdigest()[:14].upper())
    if _empty(ds, "StudyDate"):
        put("StudyDate", next((ds[k].value for k in _DATES if not _empty(ds, k)), "19000101"))
    if _empty(ds, "StudyTime"):
        put("StudyTime", next((ds[k].value for k in _TIMES if not _empty(ds, k)), "000000"))
    if _empty(ds, "StudyID"):
        uid = str(ds.get("StudyInstanceUID", ""))
        put("StudyID", "DV" + hashlib.sha256(uid.encode()).hexdigest()[:8].upper())
    if _empty(ds, "Modality"):
        put("Modality", "OT")
    if _empty(ds, "SeriesNumber"):
        put("SeriesNumber", 0)
    if _empty(ds, "InstanceNumber"):
        put("InstanceNumber", position)
    return filled


def _single_values(record: Dataset) -> None:
    """A record element the dictionary makes single-valued but the instance
    has several values for (``A\\B`` in a description) gets them joined by
    `` / `` (the file itself is not changed)."""
    for elem in record:
        if elem.VR != "SQ" and elem.VM > 1 and dictionary_VM(elem.tag) == "1":
            elem.value = " / ".join(str(v) for v in elem.value)


def _trim_leaf(record: Dataset, header: Dataset) -> None:
    """pydicom copies an SR document's whole Content Sequence into its record
    (references and coordinates then fail validation) and omits the
    Verification DateTime of verified documents: keep the keys only."""
    if record.get("DirectoryRecordType") == "SR DOCUMENT":
        if "ContentSequence" in record:
            del record.ContentSequence
        if record.get("VerificationFlag") == "VERIFIED" and "VerificationDateTime" not in record:
            observers = header.get("VerifyingObserverSequence") or []
            when = observers[-1].get("VerificationDateTime") if observers else None
            if when:
                record.VerificationDateTime = when


_FIRST_OFFSET, _LAST_OFFSET, _SEQUENCE = 0x00041200, 0x00041202, 0x00041220
_NEXT, _LOWER = 0x00041400, 0x00041420


def _encode_record(record: Dataset) -> tuple[bytearray, int, int]:
    """A directory record in Explicit VR Little Endian, as pydicom's
    ``RecordNode._encode_record`` encodes it; returns the bytes and where the
    values of its two offsets are."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    encoding = record.get("SpecificCharacterSet", default_encoding)
    at_next = at_lower = -1
    for tag in sorted(record.keys()):
        if tag.element == 0 and tag.group > 6:
            continue
        if tag == _NEXT:
            at_next = fp.tell() + 8
        elif tag == _LOWER:
            at_lower = fp.tell() + 8
        write_data_element(fp, record[tag], encoding)
    if at_next < 0 or at_lower < 0:
        raise ValueError("a directory record without its offset elements")
    return bytearray(fp.getvalue()), at_next, at_lower


def _short(group: int, element: int, vr: bytes, value: str, pad: bytes) -> bytes:
    """One Explicit VR Little Endian element of a VR with a 2-byte length
    (CS, UI, IS here: ASCII values)."""
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += pad
    return struct.pack("<HH2sH", group, element, vr, len(raw)) + raw


@dataclass(frozen=True)
class _ImageLeaf:
    """An IMAGE record made from the source's records (no Dataset, no
    RecordNode: there are as many of these as instances)."""

    number: int
    charset: Any
    file_id: tuple[str, ...]
    sop_class: str
    sop_uid: str
    transfer_syntax: str

    def encode(self) -> tuple[bytearray, int, int]:
        """The bytes pydicom writes for the same record (elements in tag order)."""
        out = bytearray(struct.pack("<HH2sHI", 0x0004, 0x1400, b"UL", 4, 0))  # next: patched later
        out += struct.pack("<HH2sHH", 0x0004, 0x1410, b"US", 2, 0xFFFF)
        out += struct.pack("<HH2sHI", 0x0004, 0x1420, b"UL", 4, 0)  # lower: patched later
        out += _short(0x0004, 0x1430, b"CS", "IMAGE", b" ")
        out += _short(0x0004, 0x1500, b"CS", "\\".join(self.file_id), b" ")
        out += _short(0x0004, 0x1510, b"UI", self.sop_class, b"\x00")
        out += _short(0x0004, 0x1511, b"UI", self.sop_uid, b"\x00")
        out += _short(0x0004, 0x1512, b"UI", self.transfer_syntax, b"\x00")
        if self.charset is not None:
            values = [self.charset] if isinstance(self.charset, str) else list(self.charset)
            out += _short(0x0008, 0x0005, b"CS", "\\".join(values), b" ")
        out += _short(0x0020, 0x0013, b"IS", str(self.number), b" ")
        return out, 8, 30


def _walk(parent: RecordNode) -> Iterator[tuple[Any, Any]]:
    """(node, its next sibling or None), depth first, as pydicom orders records."""
    kids = parent.children
    for k, node in enumerate(kids):
        yield node, (kids[k + 1] if k + 1 < len(kids) else None)
        if not isinstance(node, _ImageLeaf):
            yield from _walk(node)


@dataclass(frozen=True)
class Leaf:
    """What the source's records say about one instance."""

    sop_uid: str
    sop_class: str
    series_uid: str
    modality: str
    number: int | None
    transfer_syntax: str
    patient_key: str


class DicomdirBuilder:
    """Collects one record chain per instance; writes the DICOMDIR at the end."""

    def __init__(self, fileset_id: str) -> None:
        self.fs = FileSet()
        self.fs.ID = naming.fileset_id(fileset_id) or None
        self.fs.UID = generate_uid()
        self.root = self.fs._tree
        self.nodes: dict[tuple[str, ...], RecordNode] = {}
        self.positions: dict[str, int] = {}
        # series UID -> (node, character set, SOP class of its IMAGE leaves)
        self.series: dict[str, tuple[RecordNode, Any, UID]] = {}
        self.count = 0

    def close(self) -> None:
        """Remove the staging folder pydicom's FileSet makes (we never stage)."""
        self.fs._stage["t"].cleanup()

    def add(self, leaf: Leaf, file_id: list[str], load: Callable[[], Dataset]) -> list[str]:
        """Add the records for one instance; returns the record keys that were
        filled by rule. ``load()`` gives the instance's data set without
        pixel data (file meta included); it is called only when pydicom's
        recorders need it: for the first instance of a series (PATIENT,
        STUDY and SERIES records, and the character set) and for leaves
        other than IMAGE. Later IMAGE leaves of a known series are made from
        the source's records, which hold the same values."""
        position = self.positions[leaf.series_uid] = self.positions.get(leaf.series_uid, 0) + 1
        known = self.series.get(leaf.series_uid)
        sop_class = UID(leaf.sop_class)
        # pydicom makes IMAGE the leaf of every SOP class it does not list (no
        # entry in _FOUR_LEVEL_SOP_CLASSES), unless the data set holds an
        # EncapsulatedDocument or an RTPlanLabel: so the short way is taken
        # only for the SOP class whose first instance in this series really
        # got an IMAGE record from pydicom's recorders.
        if known is not None and known[2] == sop_class and sop_class not in _FOUR_LEVEL_SOP_CLASSES \
                and leaf.modality not in ("RTINTENT", "RTSEGANN", "RTRAD", "PLAN") \
                and sop_class not in _SINGLE_LEVEL_SOP_CLASSES:
            series_node, charset, _ = known
            filled = [] if leaf.number is not None else ["InstanceNumber"]
            # a series node's children are only ever walked by write() below
            series_node.children.append(_ImageLeaf(  # type: ignore[arg-type]
                leaf.number if leaf.number is not None else position, charset, tuple(file_id),
                leaf.sop_class, leaf.sop_uid, leaf.transfer_syntax))
            self.count += 1
            return filled
        header = load()
        header.file_meta.TransferSyntaxUID = UID(leaf.transfer_syntax)
        filled = fill_record_keys(header, leaf.patient_key, position)
        records = list(self.fs._recordify(header))
        _trim_leaf(records[-1], header)
        for record in records:
            _single_values(record)
        parent: RecordNode = self.root
        path: tuple[str, ...] = ()
        for i, record in enumerate(records):
            is_leaf = i == len(records) - 1
            node = RecordNode(record)
            path = (*path, node.key)
            if not is_leaf and path in self.nodes:
                parent = self.nodes[path]
                continue
            node._parent = parent
            parent.children.append(node)
            if is_leaf:
                record.ReferencedFileID = list(file_id)
                node.instance = FileInstance(node)
            else:
                self.nodes[path] = node
            parent = node
        if len(records) == 4 and records[2].DirectoryRecordType == "SERIES" \
                and records[3].DirectoryRecordType == "IMAGE" and leaf.series_uid not in self.series:
            self.series[leaf.series_uid] = (parent.parent, header.get("SpecificCharacterSet"), sop_class)
        self.count += 1
        return filled

    def write(self, fh: BinaryIO) -> None:
        """Encode the DICOMDIR into ``fh`` (written front to back, no seeking).

        What pydicom's ``FileSet._write_dicomdir`` writes, byte for byte, but
        each record is encoded once (pydicom encodes every record twice, to
        learn the offsets and then to write) and the IMAGE leaves made from
        the source's records are encoded directly."""
        ds = self.fs._ds or self.fs._create_dicomdir()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds[_FIRST_OFFSET].value = 0
        ds[_LAST_OFFSET].value = 0
        if len(ds[_SEQUENCE + 1:]):
            raise ValueError("unexpected elements after the Directory Record Sequence")
        head = DicomBytesIO()
        head.is_implicit_VR, head.is_little_endian = False, True
        head.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(head, ds.file_meta, enforce_standard=True)
        write_dataset(head, ds[:_FIRST_OFFSET])
        first_at = head.tell()  # (0004,1200) and (0004,1202), UL: values at +8 and +20
        write_dataset(head, ds[_FIRST_OFFSET:_SEQUENCE])
        header = bytearray(head.getvalue())
        # every record encoded once, depth first (pydicom's order); then the offsets patched in
        order = list(_walk(self.root))
        encoded = [node.encode() if isinstance(node, _ImageLeaf) else _encode_record(node._record)
                   for node, _next in order]
        starts: dict[int, int] = {}
        offset = len(header) + 12  # after the sequence's tag, VR, reserved bytes and length
        for (node, _next), (data, _n, _l) in zip(order, encoded, strict=True):
            starts[id(node)] = offset
            offset += 8 + len(data)  # item tag and length, then the record
        for (node, following), (data, at_next, at_lower) in zip(order, encoded, strict=True):
            struct.pack_into("<I", data, at_next, starts[id(following)] if following is not None else 0)
            lower = () if isinstance(node, _ImageLeaf) else node.children
            struct.pack_into("<I", data, at_lower, starts[id(lower[0])] if lower else 0)
        top = self.root.children
        if top:
            struct.pack_into("<I", header, first_at + 8, starts[id(top[0])])
            struct.pack_into("<I", header, first_at + 20, starts[id(top[-1])])
        fh.write(header)
        fh.write(b"\x04\x00\x20\x12SQ\x00\x00" + struct.pack("<I", offset - len(header) - 12))
        for data, _n, _l in encoded:
            fh.write(b"\xfe\xff\x00\xe0" + struct.pack("<I", len(data)) + data)

    def write_atomic(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            self.write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
