"""Orthanc as a source: lists through the REST API, streams instance files,
and (for ``move``) deletes an instance after re-hashing what it holds."""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any, BinaryIO

from dicomvault.engine import AttachmentRecord, Attributes, Item, Opener, Rejected, Selection

from . import records as rec
from .client import Orthanc

CHUNK = 1 << 20


def sha256_of(client: Orthanc, oid: str) -> str:
    digest = hashlib.sha256()
    with client.open(f"/instances/{oid}/file") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _Hashing:
    """A response read to its end leaves the SHA-256 of what was served."""

    def __init__(self, fh: BinaryIO, done: dict[str, str], uid: str) -> None:
        self.fh, self.done, self.uid = fh, done, uid
        self.digest = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        chunk = self.fh.read(n)
        if chunk:
            self.digest.update(chunk)
        elif n != 0:
            self.done[self.uid] = self.digest.hexdigest()
        return chunk

    def close(self) -> None:
        self.fh.close()

    def __enter__(self) -> _Hashing:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class OrthancSource:
    def __init__(self, client: Orthanc) -> None:
        self.client = client
        self.description = client.name
        # SHA-256 of the bytes served per SOP UID (for instances Orthanc got from
        # others, which carry no digest): move checks deletions against it.
        self.served: dict[str, str] = {}
        self._picked: list[tuple[Any, ...]] | None = None
        self._meta: dict[str, tuple[str, dict[str, str]]] = {}  # SOP UID -> (Orthanc id, metadata)

    def _series(self, selection: Selection) -> list[tuple[Any, ...]]:
        if self._picked is None:
            studies = {s["ID"]: s for s in self.client.get_json("/studies?expand")}
            picked = []
            for se in self.client.get_json("/series?expand"):
                st = studies.get(se["ParentStudy"])
                if st is None:
                    continue  # deleted meanwhile
                p = rec.patient_of(st.get("PatientMainDicomTags", {}))
                study = rec.study_of(st["MainDicomTags"], p)
                series = rec.series_of(se["MainDicomTags"], study.study_uid)
                if selection.matches(p, study, series):
                    picked.append((p, study, series, se["ID"], st["ID"], st["ParentPatient"]))
            self._picked = picked
        return self._picked

    def _opener(self, oid: str, uid: str) -> Opener:
        return lambda: _Hashing(self.client.open(f"/instances/{oid}/file"), self.served, uid)  # type: ignore[return-value]

    def instances(self, selection: Selection) -> Iterator[Item | Rejected]:
        for p, study, series, se_id, _st_id, _p_id in self._series(selection):
            infos = self.client.get_json(f"/series/{se_id}/instances")
            found = []
            for info in infos:
                meta = self.client.metadata("instances", info["ID"])
                kept = rec.carried(meta)
                if kept is not None:
                    item = Item(kept.instance, kept.series, kept.study, kept.patient,
                                self._opener(info["ID"], kept.instance.sop_uid))
                else:
                    inst = rec.instance_of(info, meta, series.series_uid)
                    item = Item(inst, series, study, p, self._opener(info["ID"], inst.sop_uid))
                self._meta[item.instance.sop_uid] = (info["ID"], meta)
                found.append(item)
            found.sort(key=lambda it: (it.instance.number is None, it.instance.number or 0,
                                       it.instance.sop_uid))
            yield from found

    def attributes(self, selection: Selection) -> Iterator[Attributes]:
        seen: set[tuple[str, str]] = set()
        for _p, _study, _series, se_id, st_id, p_id in self._series(selection):
            for level, oid in (("patients", p_id), ("studies", st_id), ("series", se_id)):
                if (level, oid) not in seen:
                    seen.add((level, oid))
                    attrs = rec.attributes(self.client.metadata(level, oid))
                    if attrs is not None:
                        yield attrs
        if not self._meta:
            for _ in self.instances(selection):
                pass
        for _uid, (_oid, meta) in sorted(self._meta.items()):
            attrs = rec.attributes(meta)
            if attrs is not None:
                yield attrs

    def attachments(self, selection: Selection) -> Iterator[tuple[AttachmentRecord, Opener]]:
        return iter(())  # Orthanc holds none

    def delete(self, sop_uid: str, sha256: str) -> bool:
        """Delete from Orthanc if the bytes it holds still hash to ``sha256``
        (re-read and re-hashed just before; Orthanc has no atomic
        compare-and-delete, so a re-upload in between is not excluded)."""
        oid = self.client.lookup(sop_uid, "Instance")
        if oid is None or sha256_of(self.client, oid) != sha256:
            return False
        self.client.delete(f"/instances/{oid}")
        return True

    def close(self) -> None:
        pass
