"""A .bkp file as a source (Import Database) and as a target (Export
Database). Addresses: a path ending in ``.bkp``, or ``bkp:PATH``."""
from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import msgspec

from dicomvault import __version__
from dicomvault.engine import (
    AttachmentRecord,
    Attributes,
    ConflictPolicy,
    Context,
    FormatError,
    Item,
    Kind,
    Opener,
    Outcome,
    PassphraseRequiredError,
    PatientRecord,
    ReadAheadTarget,
    Rejected,
    Selection,
    SeriesRecord,
    StudyRecord,
    TargetError,
    TruncatedError,
    UsageError,
    hookimpl,
    sha256_of,
)
from dicomvault.formats.bkp.layout import file_is_encrypted
from dicomvault.formats.bkp.manifest import AttachmentEntry, Blob, InstanceEntry, Manifest
from dicomvault.formats.bkp.reader import BkpReader
from dicomvault.formats.bkp.volumes import (
    OpenVolume,
    Part,
    Record,
    VolumeSetWriter,
    attachment_cost,
    instance_cost,
    open_backup,
    sibling_volumes,
    volume_path,
    volumes_named_by,
)
from dicomvault.formats.bkp.writer import BkpWriter

# Items handed out after a volume's last one before its file is closed: well past how far the
# run loop's workers can lag behind the source (its window of 256 items plus a batch), so that
# no worker still needs the volume, which would reopen it for every late item.
RELEASE_AFTER = 1024
# Instance entries per page of the manifest (SPEC.md "Manifest pages"): about 0.5 MB encoded.
PAGE_ENTRIES = 1024


def _path(url: str) -> str:
    return url[4:] if url.startswith("bkp:") else url


def _is_bkp(url: str) -> bool:
    return url.startswith("bkp:") or ("://" not in url and url.lower().endswith(".bkp"))


class BkpSource:
    """A .bkp file, or a whole volume set (any of its volumes, or NAME.bkp
    for NAME.001.bkp...), checked complete before anything is read.

    Instance entries are never all held at once: a file of version 1.1 keeps
    them in pages (SPEC.md "Manifest pages"), read one at a time while the
    restore goes on, so memory does not grow with the number of instances."""

    def __init__(self, path: str, passphrase: str | None = None) -> None:
        self.parts = open_backup(path, passphrase)
        self.description = f"backup file {path}" if len(self.parts) == 1 and self.parts[0].volume is None \
            else f"backup volume set {self.parts[0].path} ({len(self.parts)} volumes)"
        self.patients: dict[str, PatientRecord] = {}
        self.studies: dict[str, StudyRecord] = {}
        self.series: dict[str, SeriesRecord] = {}
        self.attribute_list: dict[tuple[str, str], Attributes] = {}
        self.attachment_list: dict[str, tuple[Part, AttachmentEntry]] = {}
        # a volume's records are copies of the others' where they overlap
        for part in self.parts:
            m = part.manifest
            for p in m.patients:
                self.patients.setdefault(p.key, p)
            for st in m.studies:
                self.studies.setdefault(st.study_uid, st)
            for se in m.series:
                self.series.setdefault(se.series_uid, se)
            for a in m.attributes:
                self.attribute_list.setdefault((a.level, a.uid), a)
            for ae in m.attachments:
                self.attachment_list.setdefault(ae.record.attachment_id, (part, ae))

    def _hierarchy(self, series_uid: str) -> tuple[PatientRecord, StudyRecord, SeriesRecord] | None:
        se = self.series.get(series_uid)
        st = self.studies.get(se.study_uid) if se else None
        p = self.patients.get(st.patient_key) if st else None
        return (p, st, se) if (p and st and se) else None

    def _opener(self, part: Part, blob: Blob) -> Opener:
        return lambda: part.open_blob(blob)

    def _owners(self, selection: Selection) -> dict[str, set[str]]:
        owners: dict[str, set[str]] = {"patient": set(), "study": set(), "series": set()}
        for se in self.series.values():
            h = self._hierarchy(se.series_uid)
            if h and selection.matches(*h):
                owners["patient"].add(h[0].key)
                owners["study"].add(h[1].study_uid)
                owners["series"].add(h[2].series_uid)
        return owners

    def instances(self, selection: Selection) -> Iterator[Item | Rejected]:
        # Everything, when the whole backup is asked for: instances that no selection can reach
        # (their series, study or patient record is missing) are then said once each, rather
        # than silently left behind.
        wanted = None if selection.whole else self._owners(selection)["series"]
        # Each file's reader is told its share of the blobs, to decode frames a little ahead.
        def blobs(reader: BkpReader) -> Iterator[Blob]:
            for chunk in _in_payload_order(reader.instance_chunks(wanted, damaged=[])):  # said below
                yield from (e.blob for e in chunk)

        for part in self.parts:
            part.plan(blobs)
        # Volumes left behind, closed once the restore is well past them: a target may still
        # be reading the last few items of a volume in worker threads a while after they were
        # handed out (see Part.release).
        behind: list[tuple[int, Part]] = []
        n = 0
        for index, part in enumerate(self.parts):
            starts = [f.stream_offset for f in part.manifest.frames]
            damaged: list[tuple[int, FormatError]] = []
            for chunk in _in_payload_order(part.instance_chunks(wanted, damaged=damaged)):
                yield from _damaged_pages(part, damaged)
                for entry in chunk:
                    h = self._hierarchy(entry.record.series_uid)
                    if h is None:
                        yield Rejected(f"instance {entry.record.sop_uid}", "its series, study or patient "
                                       "record is missing from the backup; not restored")
                        continue
                    n += 1
                    while behind and behind[0][0] < n - RELEASE_AFTER:
                        behind.pop(0)[1].release()
                    batch = (index, bisect.bisect_right(starts, entry.blob.offset))
                    yield Item(entry.record, h[2], h[1], h[0], self._opener(part, entry.blob), batch=batch)
            yield from _damaged_pages(part, damaged)
            behind.append((n, part))

    def attributes(self, selection: Selection) -> Iterator[Attributes]:
        owners = self._owners(selection)
        # Attributes of single instances are rare: only for those, learn which instances the
        # selection holds (a pass over the entries, not a set of all of them).
        of_instances = {a.uid for a in self.attribute_list.values() if a.level == "instance"}
        if of_instances:
            wanted = None if selection.whole else owners["series"]
            owners["instance"] = {e.record.sop_uid for part in self.parts
                                  for chunk in part.instance_chunks(wanted, damaged=[]) for e in chunk
                                  if e.record.sop_uid in of_instances
                                  and self._hierarchy(e.record.series_uid) is not None}
        for attrs in self.attribute_list.values():
            if attrs.uid in owners.get(attrs.level, ()):
                yield attrs

    def attachments(self, selection: Selection) -> Iterator[tuple[AttachmentRecord, Opener]]:
        owners = self._owners(selection)
        for part, entry in self.attachment_list.values():
            if entry.record.uid in owners.get(entry.record.level, ()):
                yield entry.record, self._opener(part, entry.blob)

    def close(self) -> None:
        for part in self.parts:
            part.close()


class BkpTarget(ReadAheadTarget):
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
        # Instance entries wait here until a page is full, then go into the file as a page frame
        # (SPEC.md "Manifest pages"): memory holds one page, whatever the number of instances.
        self.page: dict[str, InstanceEntry] = {}
        # The SOP UIDs written out in pages, as 16-byte BLAKE2b digests (about 80 bytes an
        # instance): whether the file holds an instance, without reading pages back.
        self.paged: set[bytes] = set()
        self.attributes: dict[tuple[str, str], Attributes] = {}
        self.attachments: dict[str, AttachmentEntry] = {}

    def lookup(self, sop_uid: str) -> str | None:
        entry = self.page.get(sop_uid)
        if entry is not None:
            return entry.record.sha256
        if _uid_key(sop_uid) in self.paged:  # rare: the same UID twice in one selection
            for e in self.writer.written_entries():
                if e.record.sop_uid == sop_uid:
                    return e.record.sha256
        return None

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
        seen = _seen_before(self.lookup(rec.sop_uid), item)
        if seen is not None:
            return seen
        blob, sha_or_reason, size = self._write(item.open, rec.sha256, f"instance {rec.sop_uid}")
        if blob is None:
            return Outcome.FAILED, sha_or_reason
        record = msgspec.structs.replace(rec, sha256=sha_or_reason, size=size)
        self.page[rec.sop_uid] = InstanceEntry(record, blob)  # type: ignore[arg-type]
        if len(self.page) >= PAGE_ENTRIES:
            self.writer.add_page(list(self.page.values()))
            self.paged.update(map(_uid_key, self.page))
            self.page = {}
        self.patients.setdefault(item.patient.key, item.patient)
        self.studies.setdefault(item.study.study_uid, item.study)
        self.series.setdefault(item.series.series_uid, item.series)
        return Outcome.STORED, ""

    def _holds(self, level: str, uid: str) -> bool:
        """Whether the file holds the entity (instances are written before attributes
        and attachments, so this is known by then)."""
        if level == "patient":
            return uid in self.patients
        if level == "study":
            return uid in self.studies
        if level == "series":
            return uid in self.series
        return level == "instance" and (uid in self.page or _uid_key(uid) in self.paged)

    def put_attributes(self, attrs: Attributes, policy: ConflictPolicy) -> tuple[Outcome, str]:
        if not self._holds(attrs.level, attrs.uid):
            return Outcome.FAILED, ORPHAN.format(level=attrs.level)
        self.attributes[(attrs.level, attrs.uid)] = attrs
        return Outcome.STORED, ""

    def put_attachment(self, record: AttachmentRecord, open_: Opener,
                       policy: ConflictPolicy) -> tuple[Outcome, str]:
        if record.attachment_id in self.attachments:
            return Outcome.UNCHANGED, ""
        if not self._holds(record.level, record.uid):
            return Outcome.FAILED, ORPHAN.format(level=record.level)
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
                            series=list(self.series.values()), instances=list(self.page.values()),
                            attributes=list(self.attributes.values()),
                            attachments=list(self.attachments.values()))
        try:
            self.writer.finish(manifest)
        except BaseException:
            self.writer.abort()
            raise


class BkpVolumesTarget(ReadAheadTarget):
    """Writes a volume set NAME.001.bkp, NAME.002.bkp, ... of at most
    ``volume_size`` bytes each (SPEC.md, "Volumes"). Instances go into the
    volume open when they arrive, with the patient, study and series
    records they need and, when told beforehand (``preload_attributes``),
    the attributes of all four. Attachments, and attributes not told
    beforehand, come after the instances and go into the volume open then,
    with copies of the records of their owners. The set appears under its
    final names only when complete."""

    def __init__(self, path: str, volume_size: int, *, overwrite: bool = False, level: int = 3,
                 passphrase: str | None = None) -> None:
        final = _check_volume_output(path, overwrite)
        self.encrypted = passphrase is not None
        self.description = (f"{'encrypted ' if self.encrypted else ''}backup volume set "
                            f"{volume_path(final, 1)}")
        self.set = VolumeSetWriter(final, volume_size, writer=f"dicomvault {__version__}", level=level,
                                   overwrite=overwrite, passphrase=passphrase)
        self.sha: dict[str, str] = {}  # SOP Instance UID -> SHA-256, over all volumes
        self.attachment_ids: set[str] = set()
        self.patients: dict[str, PatientRecord] = {}
        self.studies: dict[str, StudyRecord] = {}
        self.series: dict[str, SeriesRecord] = {}
        self.instance_series: dict[str, str] = {}
        # Attributes known before the instances (preload_attributes): each volume then carries
        # those of every patient, study, series and instance it holds.
        self.known_attributes: dict[tuple[str, str], Attributes] = {}
        self.placed_attributes: set[tuple[str, str]] = set()
        self.files: list[Path] = []

    def lookup(self, sop_uid: str) -> str | None:
        return self.sha.get(sop_uid)

    def preload_attributes(self, attributes: Iterable[Attributes]) -> None:
        """The attributes the run will hand over after the instances, told
        beforehand, so that they go into the volumes of their entities (every
        volume that holds a patient, study, series or instance record also
        holds its attributes) rather than the volume open at the end."""
        for attrs in attributes:
            self.known_attributes[(attrs.level, attrs.uid)] = attrs

    def _attributes_of(self, item: Item) -> tuple[Attributes, ...]:
        keys = [("patient", item.patient.key), ("study", item.study.study_uid),
                ("series", item.series.series_uid), ("instance", item.instance.sop_uid)]
        return tuple(self.known_attributes[k] for k in keys if k in self.known_attributes)

    def _held(self, level: str, uid: str, records: tuple[Record, ...]) -> bool:
        if level == "instance":
            return uid in self.instance_series
        return len(records) == {"patient": 1, "study": 2, "series": 3}.get(level, -1)

    def _chain(self, level: str, uid: str) -> tuple[Record, ...]:
        """The records an entity of ``level`` ``uid`` needs, as far as they are known."""
        if level == "instance":
            level, uid = "series", self.instance_series.get(uid, "")
        se = self.series.get(uid) if level == "series" else None
        st = self.studies.get(se.study_uid if se else uid) if level in ("series", "study") else None
        p = self.patients.get(st.patient_key if st else uid)
        return tuple(r for r in (p, st, se) if r is not None)

    def _write(self, open_: Opener, expected: str, what: str, size: int, cost: int,
               records: tuple[Record, ...],
               attributes: tuple[Attributes, ...] = ()) -> tuple[OpenVolume | None, Blob | None, str]:
        # Something too large for a volume, or a volume that cannot be started, spoils the
        # whole set: a TargetError stops the run at once, and finish(False) keeps no volume.
        vol = self._place(size=size, cost=cost, records=records, what=what, attributes=attributes)
        digest = hashlib.sha256()
        with open_() as fh:
            blob = vol.writer.add_blob(fh, digest.update)
        got = digest.hexdigest()
        self.set.check_room(vol)
        if expected and got != expected:
            return None, None, (f"{what}: the bytes read do not match their SHA-256 (stored copy damaged?); "
                                "not written")
        return vol, blob, got

    def _place(self, *, size: int, cost: int, records: tuple[Record, ...], what: str,
               attributes: tuple[Attributes, ...] = ()) -> OpenVolume:
        try:
            return self.set.place(size=size, cost=cost, records=records, what=what, attributes=attributes)
        except OSError as exc:
            raise TargetError(f"cannot write the next volume of {self.description}: "
                              f"{exc.strerror or exc}; nothing was kept") from exc

    def put_instance(self, item: Item, policy: ConflictPolicy) -> tuple[Outcome, str]:
        rec = item.instance
        seen = _seen_before(self.lookup(rec.sop_uid), item)
        if seen is not None:
            return seen
        records = (item.patient, item.study, item.series)
        attributes = self._attributes_of(item)
        vol, blob, sha_or_reason = self._write(item.open, rec.sha256, f"instance {rec.sop_uid}", rec.size,
                                               instance_cost(rec), records, attributes)
        if blob is None:
            return Outcome.FAILED, sha_or_reason
        record = msgspec.structs.replace(rec, sha256=sha_or_reason, size=blob.length)
        assert vol is not None
        self.set.add_instance(vol, InstanceEntry(record, blob), records, attributes)  # type: ignore[arg-type]
        self.placed_attributes.update((a.level, a.uid) for a in attributes)
        self.sha[rec.sop_uid] = sha_or_reason
        self.patients.setdefault(item.patient.key, item.patient)
        self.studies.setdefault(item.study.study_uid, item.study)
        self.series.setdefault(item.series.series_uid, item.series)
        self.instance_series[rec.sop_uid] = item.series.series_uid
        return Outcome.STORED, ""

    def put_attributes(self, attrs: Attributes, policy: ConflictPolicy) -> tuple[Outcome, str]:
        key = (attrs.level, attrs.uid)
        if key in self.placed_attributes and self.known_attributes.get(key) == attrs:
            return Outcome.STORED, ""  # already in the volume(s) of its entity
        records = self._chain(attrs.level, attrs.uid)
        if not self._held(attrs.level, attrs.uid, records):
            return Outcome.FAILED, ORPHAN.format(level=attrs.level)
        vol = self._place(size=0, cost=len(msgspec.msgpack.encode(attrs)), records=records,
                          what=f"the attributes of {attrs.level} {attrs.uid}")
        self.set.add_attributes(vol, attrs, records)
        return Outcome.STORED, ""

    def put_attachment(self, record: AttachmentRecord, open_: Opener,
                       policy: ConflictPolicy) -> tuple[Outcome, str]:
        if record.attachment_id in self.attachment_ids:
            return Outcome.UNCHANGED, ""
        records = self._chain(record.level, record.uid)
        if not self._held(record.level, record.uid, records):
            return Outcome.FAILED, ORPHAN.format(level=record.level)
        vol, blob, sha_or_reason = self._write(open_, record.sha256, f"attachment {record.attachment_id}",
                                               record.size, attachment_cost(record), records)
        if blob is None:
            return Outcome.FAILED, sha_or_reason
        assert vol is not None
        self.set.add_attachment(vol, AttachmentEntry(record, blob), records)  # type: ignore[arg-type]
        self.attachment_ids.add(record.attachment_id)
        return Outcome.STORED, ""

    def finish(self, ok: bool) -> None:
        if not ok:
            self.set.abort()
            return
        self.files = self.set.finish()


def _in_payload_order(chunks: Iterable[list[InstanceEntry]]) -> Iterator[list[InstanceEntry]]:
    """Each list of entries sorted by blob offset, so frames are read front to back (the
    writer appends in entry order; a file written otherwise is read right, only less smoothly)."""
    for chunk in chunks:
        chunk.sort(key=lambda e: e.blob.offset)
        yield chunk


def _damaged_pages(part: Part, damaged: list[tuple[int, FormatError]]) -> Iterator[Rejected]:
    """A damaged page: its instances are unknown, the rest of the file goes on."""
    for k, exc in damaged:
        count = part.manifest.pages[k].count if isinstance(part.manifest.pages, list) else 0
        yield Rejected(f"page {k} of {part.path.name}", f"{exc}; the {count} instances it lists "
                       "were not restored (bkp salvage may recover them)")
    damaged.clear()


def _uid_key(sop_uid: str) -> bytes:
    return hashlib.blake2b(sop_uid.encode(), digest_size=16).digest()


def _seen_before(stored: str | None, item: Item) -> tuple[Outcome, str] | None:
    """The outcome for a SOP Instance UID the file already holds (``stored``: its SHA-256);
    the item's bytes are hashed only then, when its source did not say their SHA-256."""
    if stored is None:
        return None
    if stored == sha256_of(item):
        return Outcome.UNCHANGED, ""
    return Outcome.CONFLICT, "the selection holds two different instances with this UID"


ORPHAN = ("its {level} holds no instance in this backup, and a .bkp keeps attributes and attachments "
          "with the images of their owner; not written")


def _check_output(path: str, overwrite: bool) -> Path:
    final = Path(path)
    if final.is_dir():
        raise UsageError(f"{path} is a folder; give the name of the .bkp file to write")
    if final.exists() and not final.is_file():
        # --force replaces by renaming over the name: never a device, a pipe or a socket
        raise UsageError(f"{path} exists and is not a regular file; it is never replaced")
    if final.exists() and not overwrite:
        raise UsageError(f"{path} exists; choose another name or pass --force to replace it")
    if not final.parent.is_dir():
        raise UsageError(f"the folder {final.parent} does not exist")
    return final


def _check_volume_output(path: str, overwrite: bool) -> Path:
    final = Path(path)
    if not final.parent.is_dir():
        raise UsageError(f"the folder {final.parent} does not exist")
    existing = [p for ps in sibling_volumes(final.parent, final.name[:-4]).values() for p in ps]
    if final.exists() and not final.is_file():
        raise UsageError(f"{path} exists and is not a regular file; it is never replaced")
    if final.exists():
        existing.append(final)  # it would be read instead of the set
    if existing and not overwrite:
        raise UsageError(f"{sorted(existing)[0]} exists; choose another name or pass --force to "
                         "replace that volume set")
    return final


def _open_source(url: str, ctx: Context) -> BkpSource:
    path = _path(url)
    try:
        try:
            return BkpSource(path, ctx.passphrase.get(f"the backup {path}", ask=False))
        except PassphraseRequiredError:
            # Encrypted, and no --passphrase-env/--passphrase-file: ask in a terminal, else say how.
            return BkpSource(path, ctx.passphrase.get(f"the encrypted backup {path}"))
    except TruncatedError as exc:
        # a set's volumes are all encrypted or none: any of them tells when the name is the set's
        volumes = volumes_named_by(Path(path))
        if file_is_encrypted(volumes[min(volumes)][0] if volumes else path):  # not scanned by salvage
            raise
        raise TruncatedError(f"{exc} (`dicomvault bkp salvage` recovers its intact instances into a "
                             "new file)") from exc


def _open_target(url: str, ctx: Context) -> BkpTarget | BkpVolumesTarget:
    path, overwrite = _path(url), bool(getattr(ctx, "force", False))
    volume_size = getattr(ctx, "volume_size", None)
    passphrase = None
    if ctx.passphrase.encrypt:
        # before asking for a passphrase
        _check_volume_output(path, overwrite) if volume_size else _check_output(path, overwrite)
        passphrase = ctx.passphrase.get(f"the new encrypted backup {path}", confirm=True)
    if volume_size:
        return BkpVolumesTarget(path, volume_size, overwrite=overwrite, passphrase=passphrase)
    return BkpTarget(path, overwrite=overwrite, passphrase=passphrase)


@hookimpl
def dicomvault_register_sources() -> list[Kind]:
    return [Kind(name="bkp", description="a .bkp backup file (PATH.bkp or bkp:PATH)", matches=_is_bkp,
                 open=_open_source)]


@hookimpl
def dicomvault_register_targets() -> list[Kind]:
    return [Kind(name="bkp", description="a new .bkp backup file (PATH.bkp or bkp:PATH)",
                 matches=_is_bkp, open=_open_target)]
