"""The DICOMDIR: built on pydicom's FileSet, around three of its gaps.

pydicom's ``FileSet.add`` writes every instance to a staging copy with
``save_as`` (not byte-identical, and slow) and later copies it again under
its own File IDs; ``RecordNode.add`` finds siblings by a linear scan. We
need byte-identical files under *our* File IDs, so we use FileSet for what
it does well -- making the directory records (``_recordify``: PATIENT,
STUDY, SERIES and the right leaf type for the SOP Class) and encoding the
DICOMDIR with its record offsets (``_write_dicomdir``) -- and link the
record tree ourselves, with dictionaries.

Record keys the standard makes Type 1 but the instance lacks are filled by
one rule (README, "DICOMDIR"), and each filling is reported as a warning:

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import Dataset
from pydicom.datadict import dictionary_VM
from pydicom.filebase import DicomFileLike
from pydicom.fileset import (
    _FOUR_LEVEL_SOP_CLASSES,
    _SINGLE_LEVEL_SOP_CLASSES,
    FileInstance,
    FileSet,
    RecordNode,
)
from pydicom.uid import UID, generate_uid

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
        self.series: dict[str, tuple[RecordNode, Any]] = {}  # series UID -> (node, character set)
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
        if known is not None and _FOUR_LEVEL_SOP_CLASSES.get(sop_class) == "IMAGE" \
                and leaf.modality not in ("RTINTENT", "RTSEGANN", "RTRAD", "PLAN") \
                and sop_class not in _SINGLE_LEVEL_SOP_CLASSES:
            series_node, charset = known
            record = Dataset()
            filled = []
            if leaf.number is None:
                filled.append("InstanceNumber")
            record.InstanceNumber = leaf.number if leaf.number is not None else position
            record.OffsetOfTheNextDirectoryRecord = 0
            record.RecordInUseFlag = 0xFFFF
            record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
            record.DirectoryRecordType = "IMAGE"
            if charset is not None:
                record.SpecificCharacterSet = charset
            record.ReferencedFileID = list(file_id)
            record.ReferencedSOPClassUIDInFile = leaf.sop_class
            record.ReferencedSOPInstanceUIDInFile = leaf.sop_uid
            record.ReferencedTransferSyntaxUIDInFile = leaf.transfer_syntax
            node = RecordNode(record)
            node._parent = series_node
            series_node.children.append(node)
            node.instance = FileInstance(node)
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
        if len(records) == 4 and records[2].DirectoryRecordType == "SERIES":
            self.series.setdefault(leaf.series_uid, (parent.parent, header.get("SpecificCharacterSet")))
        self.count += 1
        return filled

    def write(self, fh: BinaryIO) -> None:
        self.fs._write_dicomdir(DicomFileLike(fh))

    def write_atomic(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            self.write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
