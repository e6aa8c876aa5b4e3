"""A .bkp file as a source (Import Database) and as a target (Export
Database). Addresses: a path ending in ``.bkp``, or ``bkp:PATH``."""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import msgspec

from dicomvault import __version__
from dicomvault.engine import (
    AttachmentRecord,
    Attributes,
    ConflictPolicy,
    Context,
    Item,
    Kind,
    Opener,
    Outcome,
    PassphraseRequiredError,
    PatientRecord,
    Rejected,
    Selection,
    SeriesRecord,
    StudyRecord,
    UsageError,
    hookimpl,
)
from dicomvault.formats.bkp.manifest import AttachmentEntry, Blob, InstanceEntry, Manifest
from dicomvault.formats.bkp.reader import BkpReader
from dicomvault.formats.bkp.writer import BkpWriter


def _path(url: str) -> str:
    return url[4:] if url.startswith("bkp:") else url


def _is_bkp(url: str) -> bool:
    return url.startswith("bkp:") or ("://" not in url and url.lower().endswith(".bkp"))


class BkpSource:
    def __init__(self, path: str, passphrase: str | None = None) -> None:
        self.reader = BkpReader(path, passphrase=passphrase)
        self.description = f"backup file {path}"
        m = self.reader.manifest
        self.patients = {p.key: p for p in m.patients}
        self.studies = {s.study_uid: s for s in m.studies}
        self.series = {s.series_uid: s for s in m.series}

    def _hierarchy(self, series_uid: str) -> tuple[PatientRecord, StudyRecord, SeriesRecord] | None:
        se = self.series.get(series_uid)
        st = self.studies.get(se.study_uid) if se else None
        p = self.patients.get(st.patient_key) if st else None
        return (p, st, se) if (p and st and se) else None

    def _opener(self, blob: Blob) -> Opener:
        return lambda: self.reader.open_blob(blob)

    def _owners(self, selection: Selection) -> dict[str, set[str]]:
        owners: dict[str, set[str]] = {"patient": set(), "study": set(), "series": set()}
        for se in self.series.values():
            h = self._hierarchy(se.series_uid)
            if h and selection.matches(*h):
                owners["patient"].add(h[0].key)
                owners["study"].add(h[1].study_uid)
                owners["series"].add(h[2].series_uid)
        return owners

    def _selected_entries(self, selection: Selection) -> list[InstanceEntry]:
        wanted = self._owners(selection)["series"]
        return [e for e in self.reader.manifest.instances if e.record.series_uid in wanted]

    def instances(self, selection: Selection) -> Iterator[Item | Rejected]:
        if selection.whole:
            # Instances that no selection can reach: their series, study or patient record is
            # missing from the file. Said once each, rather than silently left behind.
            for entry in self.reader.manifest.instances:
                if self._hierarchy(entry.record.series_uid) is None:
                    yield Rejected(f"instance {entry.record.sop_uid}", "its series, study or patient "
                                   "record is missing from the backup; not restored")
        # In payload order, so frames are read once each, front to back, decoded a little ahead.
        entries = sorted(self._selected_entries(selection), key=lambda e: e.blob.offset)
        self.reader.plan(e.blob for e in entries)
        for entry in entries:
            h = self._hierarchy(entry.record.series_uid)
            assert h is not None
            yield Item(entry.record, h[2], h[1], h[0], self._opener(entry.blob))

    def attributes(self, selection: Selection) -> Iterator[Attributes]:
        owners = self._owners(selection)
        owners["instance"] = {e.record.sop_uid for e in self._selected_entries(selection)}
        for attrs in self.reader.manifest.attributes:
            if attrs.uid in owners.get(attrs.level, ()):
                yield attrs

    def attachments(self, selection: Selection) -> Iterator[tuple[AttachmentRecord, Opener]]:
        owners = self._owners(selection)
        for entry in self.reader.manifest.attachments:
            if entry.record.uid in owners.get(entry.record.level, ()):
                yield entry.record, self._opener(entry.blob)

    def close(self) -> None:
        self.reader.close()


class BkpTarget:
    """Writes a new .bkp file; it appears under its name only when complete."""

    def __init__(self, path: str, *, overwrite: bool = False, level: int = 3,
                 passphrase: str | None = None) -> None:
        final = _check_output(path, overwrite)
        self.encrypted = passphrase is not None
        self.description = f"{'encrypted ' if self.encrypted else ''}backup file {path}"
        self.writer = BkpWriter(final, writer=f"dicomvault {__version__}", level=level, passphrase=passphrase)
        self.patients: dict[str, PatientRecord] = {}
        self.studies: dict[str, StudyRecord] = {}
        self.series: dict[str, SeriesRecord] = {}
        self.instances: dict[str, InstanceEntry] = {}
        self.attributes: dict[tuple[str, str], Attributes] = {}
        self.attachments: dict[str, AttachmentEntry] = {}

    def lookup(self, sop_uid: str) -> str | None:
        entry = self.instances.get(sop_uid)
        return entry.record.sha256 if entry else None

    def _write(self, open_: Opener, expected: str, what: str) -> tuple[Blob | None, str, int]:
        digest = hashlib.sha256()
        with open_() as fh:
            blob = self.writer.add_blob(fh, digest.update)
        got = digest.hexdigest()
        if expected and got != expected:
            return None, (f"{what}: the bytes read do not match their SHA-256 (stored copy damaged?); "
                          "not written"), blob.length
        return blob, got, blob.length

    def put_instance(self, item: Item, policy: ConflictPolicy) -> tuple[Outcome, str]:
        rec = item.instance
        stored = self.lookup(rec.sop_uid)
        if stored is not None and (not rec.sha256 or stored == rec.sha256):
            return Outcome.UNCHANGED, ""
        if stored is not None:
            return Outcome.CONFLICT, "the selection holds two different instances with this UID"
        blob, sha_or_reason, size = self._write(item.open, rec.sha256, f"instance {rec.sop_uid}")
        if blob is None:
            return Outcome.FAILED, sha_or_reason
        record = msgspec.structs.replace(rec, sha256=sha_or_reason, size=size)
        self.instances[rec.sop_uid] = InstanceEntry(record, blob)  # type: ignore[arg-type]
        self.patients.setdefault(item.patient.key, item.patient)
        self.studies.setdefault(item.study.study_uid, item.study)
        self.series.setdefault(item.series.series_uid, item.series)
        return Outcome.STORED, ""

    def put_attributes(self, attrs: Attributes, policy: ConflictPolicy) -> tuple[Outcome, str]:
        self.attributes[(attrs.level, attrs.uid)] = attrs
        return Outcome.STORED, ""

    def put_attachment(self, record: AttachmentRecord, open_: Opener,
                       policy: ConflictPolicy) -> tuple[Outcome, str]:
        if record.attachment_id in self.attachments:
            return Outcome.UNCHANGED, ""
        blob, sha_or_reason, _size = self._write(open_, record.sha256, f"attachment {record.attachment_id}")
        if blob is None:
            return Outcome.FAILED, sha_or_reason
        self.attachments[record.attachment_id] = AttachmentEntry(record, blob)  # type: ignore[arg-type]
        return Outcome.STORED, ""

    def finish(self, ok: bool) -> None:
        if not ok:
            self.writer.abort()
            return
        manifest = Manifest(major=0, minor=0, writer="", created="",
                            patients=list(self.patients.values()), studies=list(self.studies.values()),
                            series=list(self.series.values()), instances=list(self.instances.values()),
                            attributes=list(self.attributes.values()),
                            attachments=list(self.attachments.values()))
        try:
            self.writer.finish(manifest)
        except BaseException:
            self.writer.abort()
            raise


def _check_output(path: str, overwrite: bool) -> Path:
    final = Path(path)
    if final.exists() and not overwrite:
        raise UsageError(f"{path} exists; choose another name or pass --force to replace it")
    if not final.parent.is_dir():
        raise UsageError(f"the folder {final.parent} does not exist")
    return final


def _open_source(url: str, ctx: Context) -> BkpSource:
    path = _path(url)
    try:
        return BkpSource(path, ctx.passphrase.get(f"the backup {path}", ask=False))
    except PassphraseRequiredError:
        # Encrypted, and no --passphrase-env/--passphrase-file: ask in a terminal, else say how.
        return BkpSource(path, ctx.passphrase.get(f"the encrypted backup {path}"))


def _open_target(url: str, ctx: Context) -> BkpTarget:
    path, overwrite = _path(url), bool(getattr(ctx, "force", False))
    passphrase = None
    if ctx.passphrase.encrypt:
        _check_output(path, overwrite)  # before asking for a passphrase
        passphrase = ctx.passphrase.get(f"the new encrypted backup {path}", confirm=True)
    return BkpTarget(path, overwrite=overwrite, passphrase=passphrase)


@hookimpl
def dicomvault_register_sources() -> list[Kind]:
    return [Kind(name="bkp", description="a .bkp backup file (PATH.bkp or bkp:PATH)", matches=_is_bkp,
                 open=_open_source)]


@hookimpl
def dicomvault_register_targets() -> list[Kind]:
    return [Kind(name="bkp", description="a new .bkp backup file (PATH.bkp or bkp:PATH)",
                 matches=_is_bkp, open=_open_target)]
