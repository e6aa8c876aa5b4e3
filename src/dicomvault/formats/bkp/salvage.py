"""``bkp salvage``: recover every intact instance of a damaged or truncated
.bkp into a new, valid .bkp (SPEC.md section 16).

Two ways, tried in this order:

1. **With the manifest** (the footer and manifest frame are intact; the
   damage is in data frames): every instance and attachment whose frames
   read back and whose SHA-256 matches its record is copied with its
   records; attributes of entities that survive are kept.
2. **Without it** (truncated file, damaged footer or manifest): the file is
   scanned forward frame by frame; a damaged frame header is skipped by
   searching for the next frame magic. Intact data frames with consecutive
   sequence numbers form runs of the payload stream; in each run, a Part 10
   file begins wherever ``DICM`` sits 128 bytes after the start of a
   candidate, and ends where the next one begins. A candidate is kept only
   when its header parses as a complete instance (the same check as ingest:
   pixel data present in full); its records are rebuilt from its header.
   Without a manifest nothing can prove that such a file is byte-identical
   to what was backed up (there is no recorded SHA-256 to compare with);
   the report says so. Attributes and attachments are not recoverable this
   way, and neither are raw data sets without a Part 10 header.

Memory stays flat: one frame at a time, candidates spooled to a temporary
file in the output's folder.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import msgspec
from pydicom.filereader import _read_file_meta_info, data_element_generator, read_preamble
from pydicom.uid import UID

from dicomvault import __version__
from dicomvault.dicom.probe import NotInstance, read_header
from dicomvault.engine import (
    Attributes,
    FormatError,
    InstanceRecord,
    PatientRecord,
    SeriesRecord,
    StudyRecord,
    UnsupportedFeatureError,
)

from .layout import (
    FRAME,
    FRAME_DATA,
    FRAME_MAGIC,
    FRAME_MANIFEST,
    HEADER,
    HEADER_MAGIC,
    KNOWN_CODECS,
    file_is_encrypted,
    header_flags,
    xxh3,
)
from .manifest import AttachmentEntry, InstanceEntry, Manifest
from .reader import BkpReader, decompress, open_named
from .writer import BkpWriter

MAX_FRAME_RAW = 1 << 30  # a frame announcing more is treated as damaged (writers use 4 MiB)


class SalvageResult(msgspec.Struct, kw_only=True):
    source: str
    output: str
    method: str = ""  # "manifest", "scan", or "manifest+scan" (the manifest, and a scan for damaged pages)
    instances_recovered: int = 0
    instances_lost: int | None = None  # known only with the manifest (None: unknown, by scanning)
    attachments_recovered: int = 0
    attachments_lost: int | None = None
    verified: bool = False  # True when every recovered file was checked against a recorded SHA-256
    frames_intact: int = 0
    frames_damaged: int = 0
    lost: list[str] = msgspec.field(default_factory=list)  # "instance UID: reason" (manifest only)
    notes: list[str] = msgspec.field(default_factory=list)


class _Out:
    """The new .bkp being filled."""

    def __init__(self, path: Path, passphrase: str | None) -> None:
        self.writer = BkpWriter(path, writer=f"dicomvault {__version__} (salvage)", passphrase=passphrase)
        self.patients: dict[str, PatientRecord] = {}
        self.studies: dict[str, StudyRecord] = {}
        self.series: dict[str, SeriesRecord] = {}
        self.instances: dict[str, InstanceEntry] = {}
        self.attachments: list[AttachmentEntry] = []
        self.attributes: list[Attributes] = []
        self.not_instances: set[str] = set()  # SHA-256 of files a scan must not take for instances

    def finish(self) -> None:
        self.writer.finish(Manifest(major=0, minor=0, writer="", created="",
                                    patients=list(self.patients.values()),
                                    studies=list(self.studies.values()),
                                    series=list(self.series.values()),
                                    instances=list(self.instances.values()),
                                    attributes=self.attributes, attachments=self.attachments))


def salvage(source: str | os.PathLike[str], output: str | os.PathLike[str], *,
            passphrase: str | None = None) -> SalvageResult:
    """Recover what can be recovered from ``source`` into the new file
    ``output`` (written atomically; an existing file is not replaced). An
    encrypted source needs its ``passphrase``; the output is then encrypted
    with the same passphrase (never written in the clear)."""
    src, dst = Path(source), Path(output)
    if dst.exists():
        raise FileExistsError(f"{dst} exists; choose another name")
    if src.resolve() == dst.resolve():
        raise ValueError("the output must be another file")
    result = SalvageResult(source=str(src), output=str(dst))
    encrypted = file_is_encrypted(src)
    if encrypted:
        try:
            open_named(src, passphrase=passphrase).close()  # a wrong or missing passphrase: say so first
        except FormatError as exc:
            raise type(exc)(f"{exc}; an encrypted file is salvaged only while its manifest reads: its "
                            "frames are not scanned (SPEC.md section 16)") from exc
    out = _Out(dst, passphrase if encrypted else None)
    try:
        try:
            reader = BkpReader(src, passphrase=passphrase)
        except FormatError as exc:
            result.notes.append(f"the manifest cannot be used ({exc}); scanning the frames")
            _by_scan(src, out, result)
        else:
            try:
                entries, damaged_pages = _entries(reader, result)
                _with_manifest(reader, entries, out, result)
            finally:
                reader.close()
            if damaged_pages and encrypted:
                result.instances_lost = (result.instances_lost or 0) + sum(damaged_pages)
                result.notes.append("the instances listed by damaged pages cannot be looked for in an "
                                    "encrypted file without their entries; they are lost")
            elif damaged_pages:  # what those pages listed may still be found in the frames
                result.notes.append("scanning the frames for the instances of the damaged pages")
                counted = result.frames_intact, result.frames_damaged  # already counted, once
                # an attachment that is itself a DICOM file must not come back as an instance
                out.not_instances = {a.record.sha256 for a in out.attachments}
                _by_scan(src, out, result)
                result.frames_intact, result.frames_damaged = counted
                result.method, result.verified = "manifest+scan", False
        if not (result.instances_recovered or result.attachments_recovered):
            out.writer.abort()  # nothing to keep: no empty file that looks like a backup
            result.output = ""
            result.notes.append("nothing could be recovered; no file was written")
        else:
            out.finish()
    except BaseException:
        out.writer.abort()
        raise
    return result


# ---------------------------------------------------------------------- with the manifest
def _entries(reader: BkpReader, result: SalvageResult) -> tuple[list[InstanceEntry], list[int]]:
    """The instance entries that can be read (the manifest's, the intact
    pages'), and how many entries each damaged page lists (each page named
    in ``result.lost``)."""
    entries = list(reader.manifest.instances)
    damaged: list[int] = []
    for k, page in enumerate(reader.pages):
        try:
            entries.extend(reader.read_page(k))
        except FormatError as exc:
            damaged.append(page.count)
            result.lost.append(f"page {k} of the manifest ({page.count} instances, not known by UID): {exc}")
    return entries, damaged


def _with_manifest(reader: BkpReader, entries: list[InstanceEntry], out: _Out,
                   result: SalvageResult) -> None:
    result.method, result.verified = "manifest", True
    instances_lost = attachments_lost = 0
    m = reader.manifest
    damaged: set[int] = set()
    for i in range(len(m.frames)):
        try:
            reader.read_frame(i)
            result.frames_intact += 1
        except FormatError:
            damaged.add(i)
            result.frames_damaged += 1

    def intact(blob_offset: int, length: int) -> bool:
        if not length:
            return True
        first, last = reader.frame_of(blob_offset), reader.frame_of(blob_offset + length - 1)
        return not damaged.intersection(range(first, last + 1))

    def copy(blob: msgspec.Struct, sha: str) -> msgspec.Struct | None:
        digest = hashlib.sha256()
        try:
            with reader.open_blob(blob) as fh:  # type: ignore[arg-type]
                new = out.writer.add_blob(fh, digest.update)
        except FormatError:
            return None
        return new if digest.hexdigest() == sha else None  # a mismatch stays unreferenced

    patients = {p.key: p for p in m.patients}
    studies = {s.study_uid: s for s in m.studies}
    series = {s.series_uid: s for s in m.series}
    for e in sorted(entries, key=lambda e: e.blob.offset):
        rec = e.record
        blob = copy(e.blob, rec.sha256) if intact(e.blob.offset, e.blob.length) else None
        hierarchy = series.get(rec.series_uid)
        study = studies.get(hierarchy.study_uid) if hierarchy else None
        patient = patients.get(study.patient_key) if study else None
        if blob is None or hierarchy is None or study is None or patient is None:
            instances_lost += 1
            why = "its bytes are damaged" if blob is None else "its series, study or patient is missing"
            result.lost.append(f"instance {rec.sop_uid}: {why}")
            continue
        out.instances[rec.sop_uid] = InstanceEntry(rec, blob)  # type: ignore[arg-type]
        out.series.setdefault(hierarchy.series_uid, hierarchy)
        out.studies.setdefault(study.study_uid, study)
        out.patients.setdefault(patient.key, patient)
        result.instances_recovered += 1
    kept = {"patient": set(out.patients), "study": set(out.studies), "series": set(out.series),
            "instance": set(out.instances)}
    for a in sorted(m.attachments, key=lambda e: e.blob.offset):
        blob = copy(a.blob, a.record.sha256) if intact(a.blob.offset, a.blob.length) else None
        if blob is None or a.record.uid not in kept.get(a.record.level, set()):
            attachments_lost += 1
            result.lost.append(f"attachment {a.record.attachment_id}: "
                               + ("its bytes are damaged" if blob is None else "its owner was not recovered"))
            continue
        out.attachments.append(AttachmentEntry(a.record, blob))  # type: ignore[arg-type]
        result.attachments_recovered += 1
    out.attributes = [a for a in m.attributes if a.uid in kept.get(a.level, set())]
    result.instances_lost, result.attachments_lost = instances_lost, attachments_lost


# ---------------------------------------------------------------------- by scanning
def _frames(mm: mmap.mmap, result: SalvageResult) -> Iterator[tuple[int, bytes] | None]:
    """Intact data frames as (seq, content) in file order; ``None`` marks a
    damaged stretch. Stops at the manifest frame or the end of the file."""
    size, at = len(mm), HEADER.size
    while at + FRAME.size <= size:
        head = mm[at:at + FRAME.size]
        magic, ftype, codec, reserved, seq, stored, raw, pcheck, hcheck = FRAME.unpack(head)
        if magic != FRAME_MAGIC or xxh3(head[:40]) != hcheck or reserved:
            result.frames_damaged += 1
            yield None
            nxt = mm.find(FRAME_MAGIC, at + 1)
            if nxt < 0:
                return
            at = nxt
            continue
        end = at + FRAME.size + stored
        if ftype == FRAME_MANIFEST:
            return
        if ftype != FRAME_DATA:  # a page (its entries are lost with the manifest), or a later version's
            at = end
            continue
        payload = mm[at + FRAME.size:end]
        content = None
        if len(payload) == stored and xxh3(payload) == pcheck and codec in KNOWN_CODECS \
                and raw <= MAX_FRAME_RAW:
            content = _decode(payload, codec, raw)
        if content is None:
            result.frames_damaged += 1
            yield None
            if end > size:
                return
        else:
            result.frames_intact += 1
            yield seq, content
        at = end


def _decode(payload: bytes, codec: int, raw: int) -> bytes | None:
    try:
        return decompress(payload, codec, raw, "frame")
    except FormatError:
        return None


class _Candidate:
    """A Part 10 file being collected from the stream into a spool file."""

    def __init__(self, folder: Path) -> None:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".salvage.", suffix=".dcm")
        self.path = Path(name)
        self.fh = os.fdopen(fd, "wb")


def _by_scan(src: Path, out: _Out, result: SalvageResult) -> None:
    result.method = "scan"
    result.notes.append("recovered files are complete DICOM instances, but without the manifest "
                        "there is no recorded SHA-256 to prove them identical to the originals; "
                        "database attributes and attachments are not recoverable this way")
    folder = out.writer.final.parent
    with open(src, "rb") as fh:
        if os.fstat(fh.fileno()).st_size <= HEADER.size:
            return
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if mm[:8] != HEADER_MAGIC:
                result.notes.append("the file does not start like a .bkp; scanning anyway")
            elif header_flags(mm[:HEADER.size]):
                raise UnsupportedFeatureError("this .bkp uses header flags (an encrypted file?) that "
                                              "salvage cannot scan without its manifest")
            cand: _Candidate | None = None
            tail = b""  # the last bytes of the previous frame: "DICM" may straddle two frames
            last_seq = -2
            gap = False  # damage met since the last intact data frame
            try:
                for frame in _frames(mm, result):
                    if frame is None:
                        # Damage that is not payload (a page frame, say) loses nothing: whether a
                        # data frame went with it shows in the next one's seq.
                        gap = True
                        continue
                    if frame[0] != last_seq + 1:
                        if cand is not None:  # its continuation is lost
                            _drop(cand)
                            cand = None
                        tail = b""
                    gap = False
                    last_seq, content = frame
                    cand, tail = _split(content, tail, cand, folder, out, result)
                if cand is not None and not gap:  # damage at the very end: its continuation may be lost
                    _keep(cand, out, result)
                    cand = None
            finally:
                if cand is not None:
                    _drop(cand)


def _split(content: bytes, tail: bytes, cand: _Candidate | None, folder: Path, out: _Out,
           result: SalvageResult) -> tuple[_Candidate | None, bytes]:
    """Cut one frame's content at every Part 10 start; returns the open
    candidate and the new tail.

    A file starting at stream position p has b"DICM" at p + 128. ``buf`` is
    ``tail + content``; ``tail`` (the previous frame's last 131 bytes, or
    nothing after a gap) is already spooled to ``cand`` when there is one.
    """
    buf = tail + content
    written = len(tail)  # buf[:written] is spooled (or dropped, with no candidate)
    search = 0
    while (hit := buf.find(b"DICM", search)) >= 0:
        search = hit + 1
        start = hit - 128
        if hit + 4 <= len(tail) or start < 0:
            continue  # seen with the previous frame, or the file began before a gap
        if start < written:  # the start lies in spooled bytes: they belong to the new file
            if cand is not None:
                _truncate(cand, written - start)
                _keep(cand, out, result)
            cand = _Candidate(folder)
            cand.fh.write(buf[start:written])
        else:
            if cand is not None:
                cand.fh.write(buf[written:start])
                _keep(cand, out, result)
            cand = _Candidate(folder)
            written = start
        search = max(search, start + 132)
    if cand is not None:
        cand.fh.write(buf[written:])
    return cand, buf[-131:]


def _truncate(cand: _Candidate, n: int) -> None:
    cand.fh.flush()
    size = cand.fh.tell()
    cand.fh.truncate(max(0, size - n))
    cand.fh.seek(max(0, size - n))


def _drop(cand: _Candidate) -> None:
    cand.fh.close()
    cand.path.unlink(missing_ok=True)


def _data_set_end(path: Path) -> int | None:
    """Where the Part 10 file at ``path`` really ends: its top-level data
    elements are walked (values skipped) until the file ends, a tag does not
    follow its predecessor in ascending order, or an element cannot be
    parsed; whatever follows was glued on by the scan (the next file without
    a preamble, an attachment). ``None`` when the file cannot be walked: it
    is then taken whole. Deflated data sets are taken whole too: where their
    deflate stream ends is known, but writers may put bytes after it (pydicom's
    own test file has 8), so the true end cannot be told from what follows."""
    with open(path, "rb") as fh, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            read_preamble(fh, False)
            meta = _read_file_meta_info(fh)
        except Exception:  # pydicom raises many kinds on junk; the probe decides later
            return None
        ts = UID(str(meta.get("TransferSyntaxUID", "")))
        if not ts or ts.is_deflated or not ts.is_transfer_syntax:
            return None
        end = fh.tell()
        previous = -1
        elements = data_element_generator(fh, ts.is_implicit_VR, ts.is_little_endian, defer_size=256)
        while True:
            try:
                elem = next(elements)
            except StopIteration:
                return end
            except Exception:  # junk after the real end
                return end
            if int(elem.tag) <= previous:
                return end
            previous = int(elem.tag)
            end = fh.tell()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _keep(cand: _Candidate, out: _Out, result: SalvageResult) -> None:
    cand.fh.close()
    try:
        end = _data_set_end(cand.path)
        if end is not None and end < cand.path.stat().st_size:
            os.truncate(cand.path, end)
        try:
            header = read_header(cand.path)
        except NotInstance:
            return
        rec: InstanceRecord = header.instance
        if rec.sop_uid in out.instances:
            return
        if out.not_instances and _file_sha256(cand.path) in out.not_instances:
            return
        digest = hashlib.sha256()
        with open(cand.path, "rb") as fh:
            blob = out.writer.add_blob(fh, digest.update)
        rec = msgspec.structs.replace(rec, sha256=digest.hexdigest(), size=blob.length,
                                      origin="salvage")
        if end is None:
            result.notes.append(f"instance {rec.sop_uid}: where it ends cannot be told without the "
                                "manifest (deflated or unreadable structure); it was kept with everything "
                                "up to the next file, which may include other bytes: check it before "
                                "relying on it")
        out.instances[rec.sop_uid] = InstanceEntry(rec, blob)
        out.patients.setdefault(header.patient.key, header.patient)
        out.studies.setdefault(header.study.study_uid, header.study)
        out.series.setdefault(header.series.series_uid, header.series)
        result.instances_recovered += 1
    finally:
        cand.path.unlink(missing_ok=True)

