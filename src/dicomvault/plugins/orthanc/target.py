"""Orthanc as a target: uploads through the REST API, then downloads what
Orthanc stored and checks its SHA-256 before reporting it stored. Records
and attributes go into Orthanc metadata (see :mod:`.records`); attachments
have no place there and are reported, by name, as not transferred."""
from __future__ import annotations

import hashlib
import tempfile
from datetime import UTC, datetime

import msgspec

from dicomvault.engine import (
    AttachmentRecord,
    Attributes,
    ConflictPolicy,
    Item,
    Level,
    Opener,
    Outcome,
)

from . import records as rec
from .client import NotFound, Orthanc
from .source import sha256_of

CHUNK = 1 << 20


class OrthancTarget:
    def __init__(self, client: Orthanc) -> None:
        self.client = client
        self.description = client.name
        self._patients: dict[str, str] = {}  # patient key -> Orthanc patient id

    def _held(self, oid: str) -> str:
        """SHA-256 of what Orthanc holds: our record when it is there, else hashed."""
        kept = rec.carried(self.client.metadata("instances", oid))
        if kept is not None and kept.instance.sha256:
            return kept.instance.sha256
        return sha256_of(self.client, oid)

    def lookup(self, sop_uid: str) -> str | None:
        oid = self.client.lookup(sop_uid, "Instance")
        return self._held(oid) if oid is not None else None

    def _remember_patient(self, item: Item, oid: str) -> None:
        if item.patient.key not in self._patients:
            self._patients[item.patient.key] = self.client.get_json(f"/instances/{oid}/patient")["ID"]

    def put_instance(self, item: Item, policy: ConflictPolicy) -> tuple[Outcome, str]:
        uid = item.instance.sop_uid
        oid = self.client.lookup(uid, "Instance")
        held = self._held(oid) if oid is not None else None
        if held is not None and held == item.instance.sha256:
            self._remember_patient(item, oid)  # type: ignore[arg-type]
            return Outcome.UNCHANGED, ""
        with tempfile.TemporaryFile(prefix="dicomvault-orthanc-") as spool:
            digest = hashlib.sha256()
            with item.open() as fh:
                while chunk := fh.read(CHUNK):
                    digest.update(chunk)
                    spool.write(chunk)
            sha, size = digest.hexdigest(), spool.tell()
            if item.instance.sha256 and sha != item.instance.sha256:
                return Outcome.FAILED, (f"the bytes read do not match their SHA-256 (expected "
                                        f"{item.instance.sha256[:16]}..., got {sha[:16]}...); not sent")
            if held is not None:
                if held == sha:
                    self._remember_patient(item, oid)  # type: ignore[arg-type]
                    return Outcome.UNCHANGED, ""
                if policy is not ConflictPolicy.OVERWRITE:
                    return Outcome.CONFLICT, ""
            spool.seek(0)
            answer = self.client.upload(spool)  # type: ignore[arg-type]
        oid = answer["ID"]
        if sha256_of(self.client, oid) != sha:
            if answer.get("Status") == "AlreadyStored":
                return Outcome.FAILED, ("Orthanc kept the copy it had (its OverwriteInstances option is "
                                        "off); not overwritten")
            return Outcome.FAILED, "Orthanc holds other bytes than it was sent; not counted as stored"
        record = msgspec.structs.replace(item.instance, sha256=sha, size=size,
                                         imported_at=item.instance.imported_at
                                         or datetime.now(UTC).isoformat(timespec="seconds"))
        self.client.put_text(f"/instances/{oid}/metadata/{rec.RECORD}",
                             rec.encode(rec.Carried(record, item.series, item.study, item.patient)))
        self._patients[item.patient.key] = answer["ParentPatient"]
        return (Outcome.OVERWRITTEN if held is not None else Outcome.STORED), ""

    def _resource(self, level: Level, uid: str) -> str | None:
        if level == "patient":
            return self._patients.get(uid)
        kind = {"study": "Study", "series": "Series", "instance": "Instance"}[level]
        return self.client.lookup(uid, kind)

    def put_attributes(self, attrs: Attributes, policy: ConflictPolicy) -> tuple[Outcome, str]:
        oid = self._resource(attrs.level, attrs.uid)
        if oid is None:
            return Outcome.FAILED, f"no {attrs.level} in Orthanc to attach the attributes to"
        path = f"/{rec.LEVEL_PATH[attrs.level]}/{oid}"
        current = rec.attributes(self.client.metadata(rec.LEVEL_PATH[attrs.level], oid))
        if current is not None and not current.is_empty():
            if current == attrs:
                return Outcome.UNCHANGED, ""
            if policy is not ConflictPolicy.OVERWRITE:
                return Outcome.CONFLICT, "other attributes are stored for this entity; left untouched"
        try:
            self.client.put_text(f"{path}/metadata/{rec.ATTRIBUTES}", rec.encode(attrs))
        except NotFound:
            return Outcome.FAILED, f"the {attrs.level} is gone from Orthanc"
        return (Outcome.OVERWRITTEN if current is not None and not current.is_empty() else Outcome.STORED), ""

    def plan_attachment(self, record: AttachmentRecord, policy: ConflictPolicy) -> tuple[Outcome, str]:
        return self._no_attachments(record)

    def put_attachment(self, record: AttachmentRecord, open_: Opener,
                       policy: ConflictPolicy) -> tuple[Outcome, str]:
        return self._no_attachments(record)

    @staticmethod
    def _no_attachments(record: AttachmentRecord) -> tuple[Outcome, str]:
        return Outcome.REJECTED, (f"not transferred: Orthanc has no place for attachments (\"{record.name}\" "
                                  f"on {record.level} {record.uid if record.level != 'patient' else ''})")

    def finish(self, ok: bool) -> None:
        pass  # every upload is committed by Orthanc when it answers


