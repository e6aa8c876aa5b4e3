"""What dicomvault keeps in Orthanc, and records made from what Orthanc shows.

Orthanc has user-defined metadata on patients, studies, series and
instances (indexes 1024-65535 need no configuration). dicomvault writes:

* ``RECORD`` on an instance: its exact records (instance with SHA-256,
  import time and origin; series; study; patient), so what goes to Orthanc
  comes back identical;
* ``ATTRIBUTES`` on the entity: its database attributes (comment, tags,
  fields).

Attachments have no place in Orthanc and are not transferred (reported by
name). Instances stored in Orthanc by others get records made from
Orthanc's main DICOM tags, without a SHA-256 until their bytes are read.
"""
from __future__ import annotations

from typing import Any

import msgspec

from dicomvault.engine import (
    Attributes,
    InstanceRecord,
    Level,
    PatientRecord,
    SeriesRecord,
    StudyRecord,
    patient_key,
)

RECORD = "4201"
ATTRIBUTES = "4202"
LEVEL_PATH: dict[Level, str] = {"patient": "patients", "study": "studies", "series": "series",
                                "instance": "instances"}


class Carried(msgspec.Struct, frozen=True):
    instance: InstanceRecord
    series: SeriesRecord
    study: StudyRecord
    patient: PatientRecord


def encode(value: object) -> str:
    return msgspec.json.encode(value).decode()


def carried(meta: dict[str, str]) -> Carried | None:
    raw = meta.get(RECORD)
    if not raw:
        return None
    try:
        return msgspec.json.decode(raw, type=Carried)
    except msgspec.DecodeError:
        return None


def attributes(meta: dict[str, str]) -> Attributes | None:
    raw = meta.get(ATTRIBUTES)
    if not raw:
        return None
    try:
        return msgspec.json.decode(raw, type=Attributes)
    except msgspec.DecodeError:
        return None


def _int(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def patient_of(tags: dict[str, str]) -> PatientRecord:
    pid, name = tags.get("PatientID", ""), tags.get("PatientName", "")
    birth = tags.get("PatientBirthDate", "")
    issuer = tags.get("IssuerOfPatientID", "")
    return PatientRecord(key=patient_key(pid, issuer, name, birth), patient_id=pid, issuer=issuer, name=name,
                         birth_date=birth, sex=tags.get("PatientSex", ""))


def study_of(tags: dict[str, str], patient: PatientRecord) -> StudyRecord:
    return StudyRecord(study_uid=tags["StudyInstanceUID"], patient_key=patient.key,
                       date=tags.get("StudyDate", ""), time=tags.get("StudyTime", ""),
                       study_id=tags.get("StudyID", ""), accession=tags.get("AccessionNumber", ""),
                       description=tags.get("StudyDescription", ""))


def series_of(tags: dict[str, str], study_uid: str) -> SeriesRecord:
    return SeriesRecord(series_uid=tags["SeriesInstanceUID"], study_uid=study_uid,
                        modality=tags.get("Modality", ""), number=_int(tags.get("SeriesNumber")),
                        description=tags.get("SeriesDescription", ""))


def instance_of(info: dict[str, Any], meta: dict[str, str], series_uid: str) -> InstanceRecord:
    tags = info.get("MainDicomTags", {})
    return InstanceRecord(sop_uid=tags["SOPInstanceUID"], series_uid=series_uid,
                          sop_class_uid=meta.get("SopClassUid", ""),
                          transfer_syntax=meta.get("TransferSyntax", ""),
                          number=_int(tags.get("InstanceNumber")), size=int(info.get("FileSize", 0)),
                          imported_at=meta.get("ReceptionDate", ""), origin="orthanc")
