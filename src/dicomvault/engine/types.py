"""Public data types shared by the engine, the .bkp format and every plugin.

Records are msgspec Structs: cheap to create by the hundred thousand, and the
.bkp manifest serialises them directly. Fields are only ever added, with
defaults, so older manifests keep decoding.
"""
from __future__ import annotations

import enum
import hashlib
import os
from collections.abc import Callable, Iterator
from typing import BinaryIO, Literal

import msgspec

Level = Literal["patient", "study", "series", "instance"]
LEVELS: tuple[Level, ...] = ("patient", "study", "series", "instance")


class PatientRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A patient. ``key`` is the identity used to merge across databases."""

    key: str
    patient_id: str = ""
    issuer: str = ""
    name: str = ""
    birth_date: str = ""
    sex: str = ""


class StudyRecord(msgspec.Struct, frozen=True, kw_only=True):
    study_uid: str
    patient_key: str
    date: str = ""
    time: str = ""
    study_id: str = ""
    accession: str = ""
    description: str = ""


class SeriesRecord(msgspec.Struct, frozen=True, kw_only=True):
    series_uid: str
    study_uid: str
    modality: str = ""
    number: int | None = None
    description: str = ""


class InstanceRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One stored DICOM file. ``sha256`` is of the exact stored bytes; a
    source that has not hashed the bytes yet leaves it empty."""

    sop_uid: str
    series_uid: str
    sop_class_uid: str = ""
    transfer_syntax: str = ""
    number: int | None = None
    size: int = 0
    sha256: str = ""
    imported_at: str = ""
    origin: str = ""


class Attributes(msgspec.Struct, kw_only=True):
    """Database attributes of one entity: things DICOM itself does not hold."""

    level: Level
    uid: str  # patient key, or the study/series/SOP instance UID
    comment: str = ""
    tags: list[str] = msgspec.field(default_factory=list)
    fields: dict[str, str] = msgspec.field(default_factory=dict)

    def is_empty(self) -> bool:
        return not (self.comment or self.tags or self.fields)


class AttachmentRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A non-DICOM file (VOI definition, kinetic-model result...) attached to
    a patient, study or series."""

    attachment_id: str  # stable random UUID, identity across databases
    level: Level
    uid: str
    name: str
    media_type: str = "application/octet-stream"
    size: int = 0
    sha256: str = ""
    created_at: str = ""


Opener = Callable[[], BinaryIO]


class FileOpener:
    """The opener of a local file. Targets may use ``path`` for hints that
    cost nothing (such as asking the kernel to read the file ahead); the
    bytes are still read only through the call."""

    __slots__ = ("path",)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    def __call__(self) -> BinaryIO:
        return open(self.path, "rb")


def read_ahead(opener: Opener) -> None:
    """Ask the kernel to read a local file (a :class:`FileOpener`'s) into the
    page cache now, in the background. Targets that write items one after
    another call it from the run loop's workers (``prepare``), a window
    ahead, so that the in-order writer rarely waits for the disk. Other
    openers are never called here: opening may cost (a download)."""
    if not isinstance(opener, FileOpener) or not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(opener.path, os.O_RDONLY)
    except OSError:
        return  # the real read says what is wrong
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def stream_views(stream: BinaryIO) -> Iterator[memoryview] | None:
    """The bytes of a freshly opened stream (nothing read from it yet) as
    read-only buffers, in order, without copying them, when its source can
    give them so (a blob of a .bkp: slices of its decoded frames); None
    otherwise, and the stream is read as usual. A source offers this by a
    ``views()`` method on the streams its openers return. Each buffer is
    valid until the next one is asked for."""
    views = getattr(stream, "views", None)
    return views() if callable(views) else None  # type: ignore[no-any-return]


class Item(msgspec.Struct, frozen=True):
    """One instance travelling from a source to a target, with its place in
    the hierarchy and a way to open its bytes (read in a streaming way)."""

    instance: InstanceRecord
    series: SeriesRecord
    study: StudyRecord
    patient: PatientRecord
    open: Opener
    where: str = ""  # where the source found it, for messages (a file path); "" when the UID says enough
    # Items handed out one after another with the same (non-None) batch key share costly state in
    # the source (a .bkp: one compressed frame); the run loop has one worker prepare them in order.
    batch: object = None


class Rejected(msgspec.Struct, frozen=True):
    """Something a source found but cannot offer (not DICOM, truncated...)."""

    item: str
    reason: str
    ignored: bool = False  # fine, just not an instance (a DICOMDIR): not a problem


def patient_key(patient_id: str, issuer: str, name: str, birth_date: str) -> str:
    """Identity of a patient, the same in every database.

    PatientID (with its issuer) identifies a patient, as in a PACS. Files with
    an empty PatientID fall back to name and birth date so that two unnamed
    patients are not merged. The key is a hash, never shown to users.
    """
    if patient_id.strip():
        basis = "id\0" + issuer.strip() + "\0" + patient_id.strip()
    else:
        basis = "noid\0" + name.strip() + "\0" + birth_date.strip()
    return hashlib.sha256(basis.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class Selection(msgspec.Struct, frozen=True, kw_only=True):
    """Which part of a database an operation works on.

    Values of one kind are alternatives (OR); different kinds narrow each
    other (AND). ``whole`` selects everything. An empty selection selects
    nothing: operations that need one say so instead of guessing.
    """

    patients: tuple[str, ...] = ()
    studies: tuple[str, ...] = ()
    series: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    date_from: str = ""
    date_to: str = ""
    whole: bool = False
    any_of: tuple[Selection, ...] = ()  # alternatives, e.g. the persistent "selected" list

    def is_empty(self) -> bool:
        return not (self.whole or self.patients or self.studies or self.series
                    or self.modalities or self.date_from or self.date_to
                    or any(not s.is_empty() for s in self.any_of))

    def matches(self, patient: PatientRecord, study: StudyRecord, series: SeriesRecord) -> bool:
        if self.whole:
            return True
        if self.any_of:
            return any(s.matches(patient, study, series) for s in self.any_of)
        if self.is_empty():
            return False
        if self.patients and patient.patient_id not in self.patients and patient.key not in self.patients:
            return False
        if self.studies and study.study_uid not in self.studies:
            return False
        if self.series and series.series_uid not in self.series:
            return False
        if self.modalities and series.modality.upper() not in {m.upper() for m in self.modalities}:
            return False
        date = study.date.replace(".", "")  # old ACR-NEMA dates are YYYY.MM.DD
        if self.date_from and (not date or date < self.date_from):
            return False
        if self.date_to and (not date or date > self.date_to):
            return False
        return True


class ConflictPolicy(enum.Enum):
    """What to do when a target already holds other content under one UID."""

    SKIP = "skip"
    OVERWRITE = "overwrite"
    FAIL = "fail"


class Outcome(enum.Enum):
    """What happened to one item. The value is the word used in reports."""

    STORED = "stored"
    UNCHANGED = "unchanged"  # identical content was already there
    OVERWRITTEN = "overwritten"
    CONFLICT = "conflict"  # other content under the same UID, left untouched
    REJECTED = "rejected"  # not acceptable input (not DICOM, no UIDs...)
    IGNORED = "ignored"  # acceptable but not an instance (a DICOMDIR)
    FAILED = "failed"  # should have worked and did not (I/O, checksum)
    WOULD_STORE = "would-store"  # dry run
    WOULD_OVERWRITE = "would-overwrite"  # dry run
    # Kept by a DICOM server that answered with a warning status (coercion, elements discarded...):
    # not a problem, but not "stored" either, so nothing that deletes after a verified copy counts it.
    STORED_WITH_WARNING = "stored-with-warning"
    # Stored after a lossless conversion (another transfer syntax: decompressed for a server, Explicit
    # VR Little Endian for DICOM media): the values are the same, the bytes are not, so nothing that
    # deletes after a verified copy (move) counts it.
    CONVERTED = "converted"

    @property
    def is_problem(self) -> bool:
        return self in (Outcome.CONFLICT, Outcome.REJECTED, Outcome.FAILED)


class Event(msgspec.Struct, kw_only=True):
    """A notification for progress displays and loggers.

    ``kind`` is ``start`` (``total`` may be known), ``item`` (one outcome),
    ``warning`` or ``finish``. ``item`` names a UID, a file path or a
    position, never patient data.
    """

    kind: Literal["start", "item", "warning", "finish"]
    operation: str
    item: str = ""
    what: Literal["instance", "attachment", "attributes", "file", ""] = ""
    outcome: str = ""
    reason: str = ""
    total: int | None = None
    size: int = 0


class Problem(msgspec.Struct):
    item: str
    what: str
    outcome: str
    reason: str


class Report(msgspec.Struct, kw_only=True):
    """The summary of one operation; ``--json`` prints it as is."""

    operation: str
    counts: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)
    bytes: int = 0
    problems: list[Problem] = msgspec.field(default_factory=list)
    warnings: list[str] = msgspec.field(default_factory=list)
    details: dict[str, object] = msgspec.field(default_factory=dict)
    seconds: float = 0.0
    aborted: str = ""

    def add(self, what: str, outcome: Outcome, item: str = "", reason: str = "", size: int = 0) -> None:
        per = self.counts.setdefault(what, {})
        per[outcome.value] = per.get(outcome.value, 0) + 1
        if outcome in (Outcome.STORED, Outcome.OVERWRITTEN, Outcome.STORED_WITH_WARNING, Outcome.CONVERTED):
            self.bytes += size
        if outcome is Outcome.STORED_WITH_WARNING:
            self.warnings.append(f"{what} {item}: {reason or 'stored with a warning'}")
        if outcome.is_problem:
            self.problems.append(Problem(item, what, outcome.value, reason))

    def count(self, outcome: Outcome, what: str | None = None) -> int:
        kinds = [self.counts.get(what, {})] if what else list(self.counts.values())
        return sum(c.get(outcome.value, 0) for c in kinds)

    @property
    def done(self) -> int:
        good = (Outcome.STORED, Outcome.UNCHANGED, Outcome.OVERWRITTEN,
                Outcome.WOULD_STORE, Outcome.WOULD_OVERWRITE, Outcome.STORED_WITH_WARNING, Outcome.CONVERTED)
        return sum(self.count(o) for o in good)

    @property
    def exit_code(self) -> int:
        from .errors import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL

        if self.aborted:
            return EXIT_FAILED
        if not self.problems:
            return EXIT_OK
        return EXIT_PARTIAL if self.done else EXIT_FAILED
