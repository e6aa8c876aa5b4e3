"""Volume sets: one backup split into several complete .bkp files for
size-limited media (SPEC.md, section "Volumes").

A layer above :class:`BkpWriter` and :class:`BkpReader`: every volume is an
ordinary, self-contained .bkp file (header, frames, manifest, footer) whose
manifest carries a ``volume`` field (set id, 1-based index, ``last`` flag)
and lists the required feature ``"volumes"``. Volumes are named
``NAME.001.bkp``, ``NAME.002.bkp``, ... (at least three digits).

Writing: the set writer rolls over to a new volume before the current one
would exceed the size limit, counting the frame headers, the frame index,
the manifest and the footer at their largest possible size (frames already
written at their stored size, the rest raw; integers at 9 bytes). A blob is
never split across volumes: one larger than a volume is an error naming it. Every
volume is written by a :class:`BkpWriter` under a hidden temporary name;
only when the last volume is complete are they all renamed to their final
names, so a failed export leaves no volume under a final name.

Reading: :func:`open_backup` takes a plain .bkp, any volume of a set, or
``NAME.bkp`` when only ``NAME.001.bkp`` exists, and checks that the set is
complete before anything is read: every ``NAME.NNN.bkp`` beside it belongs
to the same set, the numbers run 1..k without a gap, each volume's index
matches its name and volume k (only) is the last. Volumes are opened
(header, footer, manifest) to check the set, then closed; a volume's data
is read later only if the selection needs it.
"""
from __future__ import annotations

import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import msgspec

from dicomvault.engine import (
    AttachmentRecord,
    Attributes,
    FormatError,
    InstanceRecord,
    PatientRecord,
    SeriesRecord,
    StudyRecord,
    TargetError,
    VolumeSetError,
)

from .crypto import KEY_TABLE, TAG_SIZE
from .layout import FOOTER, FRAME, HEADER, MAJOR, MINOR
from .manifest import (
    FEATURE_ENCRYPTION,
    FEATURE_VOLUMES,
    AttachmentEntry,
    Blob,
    InstanceEntry,
    Manifest,
    Volume,
    encoder,
)
from .reader import BkpReader, open_named
from .writer import FRAME_SIZE, BkpWriter, fsync_dir

FEATURE = FEATURE_VOLUMES
FAT32_LIMIT = (4 << 30) - 1  # the largest file FAT32 can hold: 4 GiB - 1 byte
MIN_VOLUME_SIZE = 64 << 10
MAX_U64 = (1 << 64) - 1
_FRAME_INDEX_ENTRY = 1 + 5 * 9  # an array of five integers, each at its longest
_ARRAY_GROWTH = 8 * 4  # the manifest's arrays, if their headers grow from fixarray to array32
# An encrypted volume (SPEC.md, Encryption) has a key frame after the header, a second required
# feature, and an authentication tag on every frame: counted for every volume, it is little.
_ENCRYPTION = FRAME.size + KEY_TABLE.size + TAG_SIZE + len(FEATURE_ENCRYPTION) + 1
_FRAME_COST = FRAME.size + TAG_SIZE + _FRAME_INDEX_ENTRY  # a data frame beyond its content, at most
_VOLUME_NAME = re.compile(r"^(?P<stem>.+)\.(?P<num>[0-9]{3,})\.bkp$", re.IGNORECASE)
_SIZE = re.compile(r"^(?P<num>[0-9]+(?:\.[0-9]+)?)(?P<unit>[kmgt]?)(?P<binary>i?)b?$")
_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


class VolumeSizeError(TargetError):
    """Something to be written does not fit in one volume, even an empty one.
    A ``TargetError``: the run stops at once, and no volume of the set is kept."""


def parse_size(text: str) -> int:
    """A volume size: ``fat32`` (4 GiB - 1 byte), a number of bytes, or a
    number with a decimal unit K, M, G, T (powers of 1000: ``4700M`` fits a
    DVD) or a binary one KiB, MiB, GiB, TiB (powers of 1024); a trailing
    ``B`` and a fraction (``1.5G``) are allowed."""
    t = text.strip().lower().replace(" ", "")
    if t == "fat32":
        return FAT32_LIMIT
    m = _SIZE.match(t)
    if not m or (m["binary"] and not m["unit"]):
        raise ValueError(f"'{text}' is not a size (e.g. 2G, 650M, 4700M, 1.5G, 2GiB, 123456789 or fat32)")
    base = 1024 if m["binary"] else 1000
    value = int(float(m["num"]) * base ** _UNITS[m["unit"]]) if "." in m["num"] \
        else int(m["num"]) * base ** _UNITS[m["unit"]]
    if value < MIN_VOLUME_SIZE:
        raise ValueError(f"a volume must hold at least {MIN_VOLUME_SIZE} bytes, not {value}")
    return value


def _stem(path: Path) -> str:
    name = path.name
    return name[:-4] if name.lower().endswith(".bkp") else name


def volume_path(base: Path, index: int) -> Path:
    """``NAME.bkp`` -> ``NAME.001.bkp`` (at least three digits)."""
    return base.with_name(f"{_stem(base)}.{index:03d}.bkp")


def sibling_volumes(directory: Path, stem: str) -> dict[int, list[Path]]:
    """Every ``STEM.NNN.bkp`` in ``directory``, by number."""
    out: dict[int, list[Path]] = {}
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return out
    for name in names:
        m = _VOLUME_NAME.match(name)
        if m and m["stem"] == stem:
            out.setdefault(int(m["num"]), []).append(directory / name)
    return out


def volumes_named_by(path: Path) -> dict[int, list[Path]]:
    """The volumes ``NAME.NNN.bkp`` beside ``path`` when ``path`` is the name
    of a set (``NAME.bkp``, not itself a file, not itself a volume's name),
    by number; ``{}`` otherwise."""
    if path.exists() or not path.name.lower().endswith(".bkp") or _VOLUME_NAME.match(path.name):
        return {}
    return sibling_volumes(path.parent, _stem(path))


# ====================================================================== writing


def _cost(value: object) -> int:
    return len(encoder.encode(value))


def instance_cost(record: InstanceRecord) -> int:
    """Manifest bytes of an instance entry, at most (size, SHA-256 and blob at their longest)."""
    worst = msgspec.structs.replace(record, size=MAX_U64, sha256="0" * 64)
    return _cost(InstanceEntry(worst, Blob(MAX_U64, MAX_U64)))


def attachment_cost(record: AttachmentRecord) -> int:
    worst = msgspec.structs.replace(record, size=MAX_U64, sha256="0" * 64)
    return _cost(AttachmentEntry(worst, Blob(MAX_U64, MAX_U64)))


Record = PatientRecord | StudyRecord | SeriesRecord


def base_cost(writer: str) -> int:
    """Manifest bytes of a volume without entries, at most."""
    skeleton = Manifest(major=MAJOR, minor=MINOR, writer=writer, created="2000-01-01T00:00:00+00:00",
                        required_features=[FEATURE],
                        volume=Volume(set_id="0" * 32, index=MAX_U64, last=False))
    return _cost(skeleton) + _ARRAY_GROWTH + _ENCRYPTION


def size_at_most(data: int, meta: int, base: int, frame_size: int = FRAME_SIZE) -> int:
    """The largest a volume can be with ``data`` payload bytes and entries of ``meta`` manifest bytes:
    every frame stored raw, every integer of the frame index at its longest."""
    frames = -(-data // frame_size)
    return HEADER.size + data + frames * _FRAME_COST + FRAME.size + base + meta + FOOTER.size


def records_cost(records: tuple[Record, ...]) -> int:
    return sum(_cost(r) for r in records)


def fits_alone(limit: int, size: int, cost: int, writer: str) -> bool:
    """Whether a blob of ``size`` bytes whose entry and records cost ``cost``
    manifest bytes fits in an otherwise empty volume of ``limit`` bytes."""
    return size_at_most(size, cost, base_cost(writer)) <= limit


@dataclass(frozen=True)
class DoneVolume:
    index: int
    path: Path  # its hidden name until the set is complete


@dataclass
class OpenVolume:
    index: int
    path: Path  # the hidden name it is renamed to by BkpWriter.finish; the final name comes last
    writer: BkpWriter
    base: int  # manifest bytes without entries, at most
    meta: int = 0  # manifest bytes of the entries added so far, at most
    patients: dict[str, PatientRecord] = field(default_factory=dict)
    studies: dict[str, StudyRecord] = field(default_factory=dict)
    series: dict[str, SeriesRecord] = field(default_factory=dict)
    instances: list[InstanceEntry] = field(default_factory=list)
    attributes: dict[tuple[str, str], Attributes] = field(default_factory=dict)
    attachments: list[AttachmentEntry] = field(default_factory=list)

    def has(self, rec: Record) -> bool:
        if isinstance(rec, PatientRecord):
            return rec.key in self.patients
        if isinstance(rec, StudyRecord):
            return rec.study_uid in self.studies
        return rec.series_uid in self.series

    def add(self, rec: Record) -> None:
        if self.has(rec):
            return
        self.meta += _cost(rec)
        if isinstance(rec, PatientRecord):
            self.patients[rec.key] = rec
        elif isinstance(rec, StudyRecord):
            self.studies[rec.study_uid] = rec
        else:
            self.series[rec.series_uid] = rec

    @property
    def empty(self) -> bool:
        return not (self.writer.stream_pos or self.meta)


class VolumeSetWriter:
    """Writes ``NAME.001.bkp``, ``NAME.002.bkp``, ... of at most ``volume_size`` bytes each.

    Use :meth:`place` before each blob or record group to get the volume
    that takes it (rolling over when needed), write the blob with that
    volume's ``writer``, then record the entry with :meth:`add_instance`,
    :meth:`add_attachment` or :meth:`add_attributes`. :meth:`finish` writes
    the last volume and renames the set into place; :meth:`abort` removes
    every file of the set.
    """

    def __init__(self, final: Path, volume_size: int, *, writer: str, level: int = 3,
                 overwrite: bool = False, frame_size: int | None = None, passphrase: str | None = None,
                 writer_factory: Callable[..., BkpWriter] = BkpWriter) -> None:
        self.final = final
        self.limit = volume_size
        self.writer_name = writer
        self.level = level
        self.overwrite = overwrite
        # Frames not yet compressed count at their raw size: with small volumes, smaller frames
        # let compression show sooner, so volumes fill closer to the limit.
        self.frame_size = frame_size or max(MIN_VOLUME_SIZE, min(FRAME_SIZE, volume_size // 64))
        self.writer_factory = writer_factory
        self.passphrase = passphrase  # each volume is encrypted on its own (own salt, own key)
        self.set_id = os.urandom(16).hex()
        # finished, under their hidden names: only where they are (not their entries or buffers)
        self.done: list[DoneVolume] = []
        self.renamed: list[Path] = []
        self.closed = False
        self.current = self._new_volume(1)

    # ------------------------------------------------------------ volumes
    def _new_volume(self, index: int) -> OpenVolume:
        final = volume_path(self.final, index)
        hidden = final.with_name(f".{final.name}.{self.set_id[:12]}.part")
        base = base_cost(self.writer_name)
        w = self.writer_factory(hidden, writer=self.writer_name, level=self.level, frame_size=self.frame_size,
                                passphrase=self.passphrase)
        return OpenVolume(index=index, path=hidden, writer=w, base=base)

    def _size_at_most(self, vol: OpenVolume, data: int, meta: int) -> int:
        """The largest the volume can come out with ``data`` payload bytes in all: frames
        already written count as written (compressed), the rest as if stored raw."""
        w = vol.writer
        covered = w.frames[-1].stream_offset + w.frames[-1].raw if w.frames else 0
        rest = data - covered
        frames = -(-rest // self.frame_size)
        return (w.pos + rest + frames * (FRAME.size + TAG_SIZE)
                + (len(w.frames) + frames) * _FRAME_INDEX_ENTRY + FRAME.size + vol.base + meta + FOOTER.size)

    def _close_volume(self, last: bool) -> None:
        vol = self.current
        manifest = Manifest(major=MAJOR, minor=MINOR, writer=self.writer_name, created="",
                            required_features=[FEATURE],
                            patients=list(vol.patients.values()), studies=list(vol.studies.values()),
                            series=list(vol.series.values()), instances=vol.instances,
                            attributes=list(vol.attributes.values()), attachments=vol.attachments,
                            volume=Volume(set_id=self.set_id, index=vol.index, last=last))
        try:
            vol.writer.finish(manifest)
        except BaseException:
            vol.writer.abort()
            raise
        self.done.append(DoneVolume(vol.index, vol.path))
        size = vol.path.stat().st_size
        if size > self.limit:  # cannot happen: the estimate is an upper bound
            raise VolumeSizeError(f"volume {vol.index} came out at {size} bytes, over the "
                                  f"volume size of {self.limit} bytes (a bug; nothing was kept)")

    def place(self, *, size: int, cost: int, records: tuple[Record, ...], what: str,
              attributes: tuple[Attributes, ...] = ()) -> OpenVolume:
        """The volume that takes a blob of ``size`` bytes whose entry costs
        ``cost`` manifest bytes, with the ``records`` and ``attributes`` it
        needs. Rolls over to a new volume when the current one would grow past
        the limit."""
        while True:
            vol = self.current
            meta = (vol.meta + cost + records_cost(tuple(r for r in records if not vol.has(r)))
                    + sum(_cost(a) for a in attributes if (a.level, a.uid) not in vol.attributes))
            need = self._size_at_most(vol, vol.writer.stream_pos + size, meta)
            if need <= self.limit:
                return vol
            if vol.writer.pending:  # frames still being compressed count raw: see what they came to
                vol.writer.settle()
                continue
            if vol.empty:
                alone = self._size_at_most(vol, size, cost + records_cost(records)
                                           + sum(_cost(a) for a in attributes))
                raise VolumeSizeError(f"{what} ({size} bytes) does not fit in a volume of {self.limit} "
                                      f"bytes (a volume holding only it needs up to {alone} bytes); "
                                      "choose a larger --volume-size; no volume was kept")
            self._close_volume(last=False)
            self.current = self._new_volume(vol.index + 1)

    def check_room(self, vol: OpenVolume) -> None:
        """After a blob was written: it was no larger than announced."""
        if self._size_at_most(vol, vol.writer.stream_pos, vol.meta) > self.limit:
            raise VolumeSizeError(f"volume {vol.index} would exceed {self.limit} bytes: a file grew while "
                                  "it was being read; no volume was kept")

    def add_instance(self, vol: OpenVolume, entry: InstanceEntry, records: tuple[Record, ...],
                     attributes: tuple[Attributes, ...] = ()) -> None:
        for rec in records:
            vol.add(rec)
        vol.meta += instance_cost(entry.record)
        vol.instances.append(entry)
        for attrs in attributes:
            self.add_attributes(vol, attrs, ())

    def add_attachment(self, vol: OpenVolume, entry: AttachmentEntry, records: tuple[Record, ...]) -> None:
        for rec in records:
            vol.add(rec)
        vol.meta += attachment_cost(entry.record)
        vol.attachments.append(entry)

    def add_attributes(self, vol: OpenVolume, attrs: Attributes, records: tuple[Record, ...]) -> None:
        for rec in records:
            vol.add(rec)
        old = vol.attributes.get((attrs.level, attrs.uid))
        vol.meta += _cost(attrs) - (_cost(old) if old is not None else 0)
        vol.attributes[(attrs.level, attrs.uid)] = attrs

    # ------------------------------------------------------------ finishing
    def finish(self) -> list[Path]:
        """Write the last volume, then rename every volume to its final name."""
        try:
            self._close_volume(last=True)
            finals = [volume_path(self.final, v.index) for v in self.done]
            if not self.overwrite:
                clash = [p for p in finals if p.exists()]
                if clash:
                    raise VolumeSetError(f"{clash[0]} appeared while the backup was being written; "
                                         "nothing was kept")
            special = [p for p in finals if p.exists() and not p.is_file()]
            if special:  # never rename over a folder, a device or a pipe
                raise TargetError(f"{special[0]} exists and is not a regular file; it is never replaced")
            for vol, final in zip(self.done, finals, strict=True):
                os.replace(vol.path, final)
                self.renamed.append(final)
            fsync_dir(self.final.parent)
        except BaseException:
            self.abort()
            raise
        self.closed = True
        if self.overwrite:  # a plain NAME.bkp would be read instead of the set (open_backup)
            self.final.unlink(missing_ok=True)
        if self.overwrite:  # volumes of an older, longer set under the same name would look foreign
            for paths in sibling_volumes(self.final.parent, _stem(self.final)).values():
                for p in paths:
                    if p not in finals:
                        p.unlink(missing_ok=True)
        return finals

    def abort(self) -> None:
        """Remove every file of the set: the open volume, the finished ones
        under their hidden names and any already renamed."""
        if self.closed:
            return
        self.closed = True
        try:
            self.current.writer.abort()
        finally:
            for p in [v.path for v in self.done] + self.renamed:
                p.unlink(missing_ok=True)


# ====================================================================== reading


class Part:
    """One file of a backup: its manifest, and a reader opened on demand.

    A volume's reader is closed again by :meth:`release` once no blob stream
    of it is open, so that restoring a set of a thousand volumes does not
    hold a thousand files open; it is reopened (and checked to be the same
    file) if needed later.
    """

    def __init__(self, path: Path, reader: BkpReader, *, keep_open: bool,
                 passphrase: str | None = None) -> None:
        self.path = path
        self.passphrase = passphrase
        # A volume closed after the check keeps its manifest without the instance entries: they
        # are read again when the volume is (instance_chunks), so a set of many volumes does not
        # hold all of its entries at once.
        self.manifest = reader.manifest if keep_open else \
            msgspec.structs.replace(reader.manifest, instances=[])
        self.file_id = reader.file_id
        self.volume = reader.manifest.volume if isinstance(reader.manifest.volume, Volume) else None
        self._reader: BkpReader | None = reader if keep_open else None
        self._lock = threading.Lock()
        self._streams = 0  # blob streams open on the reader
        self._retired = False  # released: close the reader whenever no stream is open
        # the blobs a restore will read, in order (BkpReader.plan): a function giving them anew,
        # as a reopened reader needs them again and a list of them all would grow with the backup
        self._plan: Callable[[BkpReader], Iterable[Blob]] | None = None
        self.opened = keep_open  # whether its data was (or may be) read
        if not keep_open:
            reader.close()

    def reader(self) -> BkpReader:
        with self._lock:
            return self._get()

    def _get(self) -> BkpReader:
        if self._reader is None:
            reader = open_named(self.path, self.passphrase)
            if reader.file_id != self.file_id:
                reader.close()
                raise VolumeSetError(f"{self.path.name} was replaced by another file while the backup "
                                     "was being read")
            self._reader = reader
            self.opened = True
            if self._plan is not None:
                reader.plan(self._plan(reader))
        return self._reader

    def plan(self, blobs: Callable[[BkpReader], Iterable[Blob]] | None) -> None:
        """The blobs about to be read from this file, in order (a function that
        gives them from the file's reader, called again if the file is
        reopened): its reader decodes their frames a little ahead (now, or
        when it is opened)."""
        with self._lock:
            self._plan = blobs
            if self._reader is not None and blobs is not None:
                self._reader.plan(blobs(self._reader))

    def instance_chunks(self, series: set[str] | None = None, *,
                        damaged: list[tuple[int, FormatError]] | None = None
                        ) -> Iterator[list[InstanceEntry]]:
        """The file's instance entries as :meth:`BkpReader.instance_chunks` gives
        them, the file held open meanwhile (a release() closes it after). A
        volume that holds none of ``series`` is not opened for this (its series
        records say which series it holds)."""
        if series is not None and series.isdisjoint(se.series_uid for se in self.manifest.series):
            return
        with self._lock:
            reader = self._get()
            self._streams += 1
        try:
            yield from reader.instance_chunks(series, damaged=damaged)
        finally:
            self._stream_closed()

    def open_blob(self, blob: Blob) -> BinaryIO:
        with self._lock:
            reader = self._get()
            self._streams += 1
        try:
            stream = reader.open_blob(blob)
        except BaseException:
            self._stream_closed()
            raise
        return cast(BinaryIO, _TrackedStream(stream, self))

    def _stream_closed(self) -> None:
        with self._lock:
            self._streams -= 1
            if self._streams == 0 and self._retired and self._reader is not None:
                self._reader.close()
                self._reader = None

    def release(self) -> None:
        """The caller is done with this volume: close the reader now if no stream
        is open, else when the last one closes. A later :meth:`open_blob` still
        works (it reopens the file, which is closed again after that stream)."""
        with self._lock:
            self._retired = True
            if self._streams == 0 and self._reader is not None:
                self._reader.close()
                self._reader = None

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None


class _TrackedStream:
    """A blob stream that tells its :class:`Part` when it is closed."""

    def __init__(self, stream: BinaryIO, part: Part) -> None:
        self._stream, self._part, self._closed = stream, part, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def read(self, size: int = -1) -> bytes:
        return self._stream.read(size)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._stream.close()
            finally:
                self._part._stream_closed()

    def __enter__(self) -> _TrackedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_backup(path: str | os.PathLike[str], passphrase: str | None = None) -> list[Part]:
    """The files of a backup: ``[the file]`` for a plain .bkp, or every
    volume of a complete set in order. See the module docstring for which
    names lead to a set; raises :class:`VolumeSetError` naming the missing or
    foreign volume when the set is not complete."""
    given = Path(path)
    if not given.exists():
        first = volume_path(given, 1)
        if found := volumes_named_by(given):
            if first.exists():
                return _open_set(first, _stem(given), None, passphrase)
            raise VolumeSetError(f"volume 1 of the set {given.name} is missing: {first.name} (found "
                                 f"{found[min(found)][0].name})")
        # BkpReader says what is wrong
        return [Part(given, BkpReader(given, passphrase=passphrase), keep_open=True, passphrase=passphrase)]
    reader = open_named(given, passphrase)
    if not isinstance(reader.manifest.volume, Volume):
        return [Part(given, reader, keep_open=True, passphrase=passphrase)]
    m = _VOLUME_NAME.match(given.name)
    if not m:
        reader.close()
        raise VolumeSetError(f"{given.name} is volume {reader.manifest.volume.index} of a set, but its name "
                             "is not of the form NAME.NNN.bkp; give the volumes back their names")
    return _open_set(given, m["stem"], reader, passphrase)


def _open_set(given: Path, stem: str, given_reader: BkpReader | None,
              passphrase: str | None) -> list[Part]:
    directory = given.parent
    parts: dict[Path, Part] = {}
    try:
        for paths in sibling_volumes(directory, stem).values():
            for p in paths:
                if given_reader is not None and p == given:
                    parts[p] = Part(p, given_reader, keep_open=False, passphrase=passphrase)
                else:
                    parts[p] = Part(p, open_named(p, passphrase), keep_open=False, passphrase=passphrase)
        return _check_set(given, stem, parts)
    except BaseException:
        if given_reader is not None:
            given_reader.close()
        for part in parts.values():
            part.close()
        raise


def _check_set(given: Path, stem: str, parts: dict[Path, Part]) -> list[Part]:
    for p, part in parts.items():
        if part.volume is None:
            raise VolumeSetError(f"{p.name} is not a volume (it is a complete backup of its own), so it does "
                                 f"not belong to the set of {given.name}; move it away")
    # The set: the one most of the files belong to; on a tie, the one of the file given.
    votes = Counter(part.volume.set_id for part in parts.values() if part.volume is not None)
    given_set = parts[given].volume.set_id if parts[given].volume is not None else ""  # type: ignore[union-attr]
    set_id = max(votes, key=lambda s: (votes[s], s == given_set))
    members: dict[int, Part] = {}
    for p, part in sorted(parts.items()):
        vol = part.volume
        assert vol is not None
        number = int(_VOLUME_NAME.match(p.name)["num"])  # type: ignore[index]
        if vol.set_id != set_id:
            raise VolumeSetError(f"{p.name} belongs to another backup (volume {vol.index} of set "
                                 f"{vol.set_id[:12]}), not to the set of the other {votes[set_id]} "
                                 f"volume(s) here (set {set_id[:12]}); put the right volume in its place")
        if vol.index != number:
            raise VolumeSetError(f"{p.name} holds volume {vol.index} of the set, not volume {number}: "
                                 "the volumes were renamed")
        if number in members:
            raise VolumeSetError(f"{members[number].path.name} and {p.name} both hold volume {number}")
        members[number] = part
    k = max(members)
    last = {i: part.volume.last for i, part in members.items() if part.volume is not None}
    name = given.parent / f"{stem}.bkp"
    for i in range(1, k + 1):
        if i not in members:
            raise VolumeSetError(f"volume {i} of the set of {given.name} is missing: "
                                 f"{volume_path(name, i).name}")
    early = [i for i in range(1, k) if last[i]]
    if early:
        raise VolumeSetError(f"{members[early[0]].path.name} says it is the last volume, but "
                             f"{members[early[0] + 1].path.name} follows it")
    if not last[k]:
        raise VolumeSetError(f"the last volume of the set of {given.name} is missing: "
                             f"{volume_path(name, k + 1).name} ({members[k].path.name} is not the last "
                             "volume, and there may be more after it)")
    return [members[i] for i in range(1, k + 1)]
