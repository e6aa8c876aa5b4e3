"""``bkp validate`` and ``bkp verify``: check a .bkp against SPEC.md and
report every finding, not just the first.

``validate`` checks structure and schema: header, footer, the manifest
(decoded, then checked against the schema and the consistency rules of
SPEC.md section 8.6), and the chain of frame headers from offset 64 to the
manifest (48 bytes each, payloads are not read). ``verify`` adds everything
that needs the payload: every frame's checksum and decoding, and the SHA-256
of every instance and attachment.

Each finding has a stable ``code`` (SPEC.md section 15): scripts may rely
on codes, never on message wording. Messages name offsets, frame numbers
and UIDs, never patient names or IDs.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import msgspec
import xxhash

from dicomvault.engine import (
    ChecksumError,
    CorruptError,
    FormatError,
    PassphraseError,
    TruncatedError,
    UnsupportedFeatureError,
    UnsupportedVersionError,
)

from .layout import (
    FLAG_ENCRYPTED,
    FOOTER,
    FOOTER_MAGIC,
    FRAME,
    FRAME_DATA,
    FRAME_KEY,
    FRAME_MAGIC,
    FRAME_MANIFEST,
    FRAME_PAGE,
    HEADER,
    HEADER_MAGIC,
    KNOWN_CODECS,
    KNOWN_FLAGS,
    MAJOR,
    PAGE_SEQ_BASE,
    is_critical_frame_type,
    xxh3,
)
from .manifest import FEATURE_PAGES, KNOWN_FEATURES, InstanceEntry, Manifest
from .reader import MAX_MANIFEST, BkpReader, decompress

ERROR, WARNING, INFO = "error", "warning", "info"
CHUNK = 16 << 20


class Finding(msgspec.Struct, frozen=True, omit_defaults=True):
    code: str
    severity: str
    message: str
    offset: int | None = None


class Result(msgspec.Struct, kw_only=True):
    """What ``bkp validate``/``bkp verify`` print with ``--json``."""

    file: str
    check: str  # "validate" or "verify"
    valid: bool = True
    version: str = ""
    size: int = 0
    frames: int = 0
    instances: int = 0
    attachments: int = 0
    bytes_verified: int = 0
    findings: list[Finding] = msgspec.field(default_factory=list)


class _Stop(Exception):
    """A finding after which nothing further can be checked."""


class _Checker:
    def __init__(self, path: Path, check: str, passphrase: str | None = None) -> None:
        self.path = path
        self.passphrase = passphrase
        self.encrypted = False
        self.data_start = HEADER.size
        self.result = Result(file=str(path), check=check)
        self.fd = -1
        self.size = 0
        self.instances: list[InstanceEntry] = []

    def add(self, code: str, message: str, offset: int | None = None, severity: str = ERROR) -> None:
        self.result.findings.append(Finding(code, severity, message, offset))
        if severity == ERROR:
            self.result.valid = False

    def stop(self, code: str, message: str, offset: int | None = None) -> None:
        self.add(code, message, offset)
        raise _Stop()

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)

    # ------------------------------------------------------------------ header and footer
    def header(self) -> tuple[int, int, bytes]:
        raw = self.pread(HEADER.size, 0)
        if raw[:8] != HEADER_MAGIC:
            self.stop("header.magic", "not a .bkp file (the header magic is missing)", 0)
        if len(raw) < HEADER.size:
            self.stop("header.truncated", "the header is incomplete", 0)
        _magic, major, minor, flags, file_id, _created, reserved, check = HEADER.unpack(raw)
        self.result.version = f"{major}.{minor}"
        if xxh3(raw[:56]) != check:
            self.add("header.checksum", "the header checksum does not match", 0)
        if major != MAJOR:
            self.stop("version.unsupported", f"format version {major}.{minor}; this release reads "
                      f"major version {MAJOR}", 0)
        if flags & ~KNOWN_FLAGS:
            self.add("header.flags", f"header flags {flags & ~KNOWN_FLAGS:#x} are set; this release does "
                     "not know them", 0)
        self.encrypted = bool(flags & FLAG_ENCRYPTED)
        if reserved != bytes(16):
            self.add("header.reserved", "reserved header bytes are not zero", 0)
        return major, minor, file_id

    def footer(self, file_id: bytes) -> tuple[int, int, int] | None:
        if self.size < HEADER.size + FOOTER.size:
            self.add("footer.missing", "the file is too short to hold a footer "
                     "(truncated: try bkp salvage)", self.size)
            return None
        at = self.size - FOOTER.size
        raw = self.pread(FOOTER.size, at)
        if raw[-8:] != FOOTER_MAGIC:
            self.add("footer.missing", "no footer at the end of the file (truncated or unfinished: "
                     "try bkp salvage)", at)
            return None
        moff, mlen, frames, fid, reserved, check, _magic = FOOTER.unpack(raw)
        if xxh3(raw[:48]) != check:
            self.add("footer.checksum", "the footer checksum does not match", at)
            return None
        if reserved != bytes(8):
            self.add("footer.reserved", "reserved footer bytes are not zero", at)
        if fid != file_id:
            self.add("footer.file-id", "header and footer belong to different .bkp files", at)
        if not (HEADER.size <= moff and mlen >= FRAME.size and moff + mlen <= at):
            self.add("footer.bounds", f"the footer points outside the file (manifest at {moff}, "
                     f"{mlen} bytes)", at)
            return None
        if moff + mlen != at:
            self.add("layout.trailing", f"{at - moff - mlen} bytes between the manifest frame and the "
                     "footer", moff + mlen)
        return moff, mlen, frames

    # ------------------------------------------------------------------ frames
    def frame_header(self, at: int) -> tuple[int, int, int, int, int, int] | None:
        raw = self.pread(FRAME.size, at)
        if len(raw) < FRAME.size:
            self.add("frame.truncated", f"frame header at offset {at} is incomplete", at)
            return None
        magic, ftype, codec, reserved, seq, stored, rawlen, pcheck, hcheck = FRAME.unpack(raw)
        if magic != FRAME_MAGIC:
            self.add("frame.magic", f"no frame at offset {at} (bad frame magic)", at)
            return None
        if xxh3(raw[:40]) != hcheck:
            self.add("frame.header-checksum", f"frame header at offset {at} is damaged", at)
            return None
        if reserved:
            self.add("frame.reserved", f"frame at offset {at}: reserved field is not zero", at)
        return ftype, codec, seq, stored, rawlen, pcheck

    def manifest(self, moff: int, mlen: int, major: int, minor: int) -> Manifest | None:
        head = self.frame_header(moff)
        if head is None:
            return None
        ftype, codec, _seq, stored, raw, check = head
        if ftype != FRAME_MANIFEST or stored != mlen - FRAME.size:
            self.add("manifest.frame", "the footer does not point at the manifest frame", moff)
            return None
        if codec not in KNOWN_CODECS:
            self.add("frame.codec", f"the manifest uses codec {codec}, unknown to this release", moff)
            return None
        if raw > MAX_MANIFEST:
            self.add("manifest.size", f"manifest length {raw} is implausible", moff)
            return None
        payload = self.pread(stored, moff + FRAME.size)
        if len(payload) != stored:
            self.add("manifest.truncated", "the manifest is incomplete", moff)
            return None
        if xxh3(payload) != check:
            self.add("manifest.checksum", "the manifest frame is damaged (checksum mismatch)", moff)
            return None
        data = self.decode(payload, codec, raw, "the manifest", moff, "manifest.decode")
        if data is None:
            return None
        try:
            plain = msgspec.msgpack.decode(data)
        except msgspec.MsgspecError as exc:
            self.add("manifest.decode", f"the manifest is not valid MessagePack: {exc}", moff)
            return None
        try:
            m = msgspec.convert(plain, Manifest, strict=True)
        except msgspec.ValidationError as exc:
            self.add("manifest.schema", f"the manifest does not match the schema: {exc}", moff)
            return None
        if m.format != "dicomvault-bkp":
            self.add("manifest.format", f"manifest format is {m.format!r}, not 'dicomvault-bkp'", moff)
        if m.major != MAJOR:
            self.stop("version.unsupported", f"the manifest has format version {m.major}.{m.minor}", moff)
        if (m.major, m.minor) != (major, minor):
            self.add("manifest.version-mismatch", f"header says {major}.{minor}, manifest "
                     f"{m.major}.{m.minor}", moff)
        unknown = [f for f in m.required_features if f not in KNOWN_FEATURES]
        if unknown:
            self.stop("feature.required-unknown", "needs feature(s) this release does not implement: "
                      + ", ".join(unknown), moff)
        for name in m.optional_features:
            if name not in KNOWN_FEATURES:
                self.add("feature.optional-unknown", f"optional feature {name!r} is not known to this "
                         "release (ignored)", moff, INFO)
        return m

    def decode(self, payload: bytes, codec: int, raw: int, what: str, at: int, code: str) -> bytes | None:
        try:
            return decompress(payload, codec, raw, what)
        except FormatError as exc:
            self.add(code, str(exc), at)
            return None

    def chain(self, moff: int) -> Iterator[tuple[int, tuple[int, int, int, int, int, int]]]:
        """The frames from the first data frame to the manifest frame, as
        (offset, header); frames of other types than data are reported here."""
        at = self.data_start
        while at < moff:
            head = self.frame_header(at)
            if head is None:
                self.add("layout.chain", f"the frame chain breaks at offset {at}", at)
                return
            ftype = head[0]
            if ftype == FRAME_MANIFEST:
                self.add("layout.manifest", f"a second manifest frame at offset {at}", at)
            elif ftype == FRAME_KEY:
                self.add("layout.key-frame", f"a key frame at offset {at}: only offset 64 may hold one", at)
            elif ftype == FRAME_PAGE:
                pass  # checked against the page index by walk()
            elif ftype != FRAME_DATA and is_critical_frame_type(ftype):
                self.add("frame.critical-unknown", f"frame at offset {at} has type {ftype}, critical "
                         "and unknown to this release", at)
            elif ftype != FRAME_DATA:
                self.add("frame.unknown", f"frame at offset {at} has type {ftype}, not critical "
                         "(skipped)", at, INFO)
            yield at, head
            at += FRAME.size + head[3]
        if at != moff:
            self.add("layout.overlap", f"the last frame before the manifest ends at {at}, the "
                     f"manifest starts at {moff}", moff)

    def walk(self, m: Manifest, moff: int, nframes: int) -> None:
        """Follow the frame headers from offset 64 to the manifest frame."""
        index = {fe.offset: i for i, fe in enumerate(m.frames)}
        if len(m.frames) != nframes:
            self.add("index.count", f"the footer counts {nframes} data frames, the index {len(m.frames)}")
        expected = 0
        for i, fe in enumerate(m.frames):
            if fe.stream_offset != expected:
                self.add("index.stream-offset", f"index entry {i}: stream offset {fe.stream_offset}, "
                         f"expected {expected}", fe.offset)
            expected += fe.raw
        seen: set[int] = set()
        pages = m.pages if isinstance(m.pages, list) else []
        page_index = {pe.offset: k for k, pe in enumerate(pages)}
        pages_seen: set[int] = set()  # index entries that point at a page frame of the chain
        seq = 0
        for at, (ftype, codec, fseq, stored, raw, _check) in self.chain(moff):
            if ftype == FRAME_PAGE:
                k = page_index.get(at)
                if k is None:
                    self.add("page.unlisted", f"page frame at offset {at} is not in the page index", at)
                    continue
                pages_seen.add(k)
                if (fseq, stored, raw, codec) != (PAGE_SEQ_BASE + k, pages[k].stored, pages[k].raw,
                                                  pages[k].codec):
                    self.add("page.mismatch", f"page frame at offset {at} does not match page index "
                             f"entry {k}", at)
                continue
            if ftype != FRAME_DATA:
                continue
            listed = index.get(at)
            if listed is None:
                self.add("index.unlisted", f"data frame {fseq} at offset {at} is not in the index", at)
            else:
                fe = m.frames[listed]
                seen.add(listed)
                if (fseq, stored, raw, codec) != (listed, fe.stored, fe.raw, fe.codec) or fseq != seq:
                    self.add("index.mismatch", f"data frame at offset {at} does not match index "
                             f"entry {listed}", at)
            if codec not in KNOWN_CODECS:
                self.add("frame.codec", f"frame at offset {at} uses codec {codec}, unknown to this "
                         "release", at)
            seq += 1
        for i, fe in enumerate(m.frames):
            if i not in seen and not (fe.offset < self.data_start or fe.offset >= moff):
                self.add("index.unvisited", f"index entry {i} points at offset {fe.offset}, which is "
                         "not a frame of the chain", fe.offset)
            elif i not in seen:
                self.add("index.bounds", f"index entry {i} points outside the frames ({fe.offset})",
                         fe.offset)
        for k, pe in enumerate(pages):
            if k not in pages_seen:
                self.add("page.unvisited", f"page index entry {k} points at offset {pe.offset}, which is "
                         "not a page frame of the chain", pe.offset)
        listed = FEATURE_PAGES in m.required_features
        if isinstance(m.pages, list) and not listed:
            self.add("page.feature", f"the manifest has a page index but does not list {FEATURE_PAGES}")
        elif listed and not pages:
            self.add("page.feature", f"the manifest lists {FEATURE_PAGES} but has no pages")
        self.stream_size = expected

    def page_entries(self, m: Manifest) -> list[InstanceEntry]:
        """Every instance entry: the manifest's and the pages' (SPEC.md section 8.7),
        each page checked as the reader checks it. (The validator holds them all,
        to check uniqueness and references; the reader never does.)"""
        entries = list(m.instances)
        pages = m.pages if isinstance(m.pages, list) else []
        if not pages:
            return entries
        try:
            reader = BkpReader(self.path, passphrase=self.passphrase, check_blobs=False)
        except (FormatError, PassphraseError) as exc:
            self.add("page.unchecked", f"the {len(pages)} pages were not read: {exc}")
            return entries
        try:
            for k, pe in enumerate(pages):
                try:
                    entries.extend(reader.read_page(k))
                except FormatError as exc:
                    self.add(_code_of(exc, "page"), str(exc), pe.offset)
        finally:
            reader.close()
        return entries

    def records(self, m: Manifest, instances: list[InstanceEntry]) -> None:
        """SPEC.md section 8.6, rules 2, 3 (sizes), 4 and 5."""
        size = self.stream_size
        for what, blob, length in ([(f"instance {e.record.sop_uid}", e.blob, e.record.size)
                                    for e in instances]
                                   + [(f"attachment {e.record.attachment_id}", e.blob, e.record.size)
                                      for e in m.attachments]):
            if blob.offset < 0 or blob.length < 0 or blob.offset + blob.length > size:
                self.add("blob.bounds", f"{what}: its blob points outside the payload stream")
            if length != blob.length:
                self.add("blob.size", f"{what}: its record says {length} bytes, its blob {blob.length}")
        for what, sha in ([(f"instance {e.record.sop_uid}", e.record.sha256) for e in instances]
                          + [(f"attachment {e.record.attachment_id}", e.record.sha256)
                             for e in m.attachments]):
            if len(sha) != 64 or sha.strip("0123456789abcdef"):
                self.add("record.sha256", f"{what}: sha256 is not 64 lower-case hexadecimal digits")

        def unique(kind: str, keys: list[str]) -> set[str]:
            seen: set[str] = set()
            for k in keys:
                if k in seen:
                    self.add("record.duplicate", f"{kind} {k} appears more than once")
                seen.add(k)
            return seen

        patients = unique("patient", [p.key for p in m.patients])
        studies = unique("study", [s.study_uid for s in m.studies])
        series = unique("series", [s.series_uid for s in m.series])
        sop_uids = unique("instance", [e.record.sop_uid for e in instances])
        unique("attachment", [e.record.attachment_id for e in m.attachments])
        unique("attributes", [f"{a.level}:{a.uid}" for a in m.attributes])
        for s in m.studies:
            if s.patient_key not in patients:
                self.add("record.dangling", f"study {s.study_uid}: its patient is not in the file")
        for se in m.series:
            if se.study_uid not in studies:
                self.add("record.dangling", f"series {se.series_uid}: its study is not in the file")
        for e in instances:
            if e.record.series_uid not in series:
                self.add("record.dangling", f"instance {e.record.sop_uid}: its series is not in the file")
        owners = {"patient": patients, "study": studies, "series": series, "instance": sop_uids}
        for a in m.attributes:
            if a.uid not in owners[a.level]:
                who = "a patient" if a.level == "patient" else f"{a.level} {a.uid}"
                self.add("record.dangling", f"attributes of {who}: the entity is not in the file")
        for att in m.attachments:
            if att.record.level == "instance" or att.record.uid not in owners[att.record.level]:
                self.add("record.dangling", f"attachment {att.record.attachment_id}: its owner is not in "
                         "the file")

    # ------------------------------------------------------------------ encryption
    def key_frame(self, moff: int) -> bool:
        """The key frame of an encrypted file (SPEC.md section 17); False when unusable."""
        head = self.frame_header(HEADER.size)
        if head is None:
            return False
        ftype, codec, _seq, stored, raw, check = head
        if ftype != FRAME_KEY or codec != 0 or stored != raw:
            self.add("key.missing", "the header says encrypted, but offset 64 holds no key frame",
                     HEADER.size)
            return False
        end = HEADER.size + FRAME.size + stored
        if end > moff:
            self.add("key.bounds", "the key frame overlaps the manifest frame", HEADER.size)
            return False
        if xxh3(self.pread(stored, HEADER.size + FRAME.size)) != check:
            self.add("key.checksum", "the key frame is damaged (checksum mismatch)", HEADER.size)
            return False
        self.data_start = end
        return True

    def sealed_chain(self, moff: int, mlen: int, nframes: int, deep: bool) -> None:
        """Without the passphrase: frame headers, the manifest's payload checksum
        and, with ``deep``, every data frame's payload checksum."""
        seq = 0
        for at, (ftype, _codec, fseq, stored, _raw, check) in self.chain(moff):
            if ftype == FRAME_PAGE:  # part of the manifest: validate checks it too
                if self.stream_xxh3(at + FRAME.size, stored) != check:
                    self.add("page.checksum", f"page frame at offset {at} is damaged (checksum mismatch)", at)
            if ftype != FRAME_DATA:
                continue
            if fseq != seq:
                self.add("index.mismatch", f"data frame at offset {at} has seq {fseq}, expected {seq}", at)
            if deep:
                got = self.stream_xxh3(at + FRAME.size, stored)
                if got is None:
                    self.add("frame.truncated", f"frame {fseq} at offset {at} is incomplete", at)
                elif got != check:
                    self.add("frame.checksum", f"frame {fseq} at offset {at} is damaged (checksum "
                             "mismatch)", at)
                else:
                    self.result.bytes_verified += stored
            seq += 1
        if seq != nframes:
            self.add("index.count", f"the footer counts {nframes} data frames, the file holds {seq}")
        head = self.frame_header(moff)
        if head is not None:
            ftype, _codec, _seq, stored, _raw, check = head
            if ftype != FRAME_MANIFEST or stored != mlen - FRAME.size:
                self.add("manifest.frame", "the footer does not point at the manifest frame", moff)
            elif self.stream_xxh3(moff + FRAME.size, stored) != check:
                self.add("manifest.checksum", "the manifest frame is damaged (checksum mismatch)", moff)
        self.result.frames = seq
        self.add("encrypted.unchecked", "the file is encrypted: its manifest, records and contents were "
                 "not checked (give the passphrase to check them)", None, INFO)

    def stream_xxh3(self, offset: int, length: int) -> int | None:
        """XXH3-64 of a byte range read in pieces (memory stays flat); None when the file ends first."""
        digest = xxhash.xxh3_64()
        while length:
            piece = self.pread(min(length, CHUNK), offset)
            if not piece:
                return None
            digest.update(piece)
            offset += len(piece)
            length -= len(piece)
        return digest.intdigest()

    def unsealed_manifest(self) -> Manifest | None:
        """With the passphrase: the manifest as the reader decrypts it."""
        try:
            reader = BkpReader(self.path, passphrase=self.passphrase)
        except PassphraseError as exc:
            self.add("key.passphrase", str(exc), HEADER.size)
            return None
        except FormatError as exc:
            self.add(_code_of(exc, "manifest"), str(exc))
            return None
        try:
            return reader.manifest
        finally:
            reader.close()

    # ------------------------------------------------------------------ verify
    def deep(self) -> None:
        """Every frame decoded and checked, every blob's SHA-256 compared."""
        try:
            reader = BkpReader(self.path, passphrase=self.passphrase)
        except (FormatError, PassphraseError) as exc:
            self.add(_code_of(exc), str(exc))
            return
        try:
            bad_frames: set[int] = set()
            for i in range(len(reader.manifest.frames)):
                try:
                    reader.read_frame(i)
                except FormatError as exc:
                    bad_frames.add(i)
                    self.add(_code_of(exc, "frame"), str(exc), reader.manifest.frames[i].offset)
            entries = sorted([(e.blob, f"instance {e.record.sop_uid}", e.record.sha256)
                              for e in self.instances]
                             + [(e.blob, f"attachment {e.record.attachment_id}", e.record.sha256)
                                for e in reader.manifest.attachments], key=lambda t: t[0].offset)
            for blob, what, sha in entries:
                if blob.length and _frames_of(reader, blob) & bad_frames:
                    self.add("blob.unreadable", f"{what}: lies in a damaged frame")
                    continue
                digest = hashlib.sha256()
                try:
                    with reader.open_blob(blob) as fh:
                        while chunk := fh.read(1 << 20):
                            digest.update(chunk)
                except FormatError as exc:
                    self.add("blob.unreadable", f"{what}: {exc}")
                    continue
                if digest.hexdigest() != sha:
                    self.add("blob.sha256", f"{what}: its SHA-256 does not match its record")
                self.result.bytes_verified += blob.length
        finally:
            reader.close()


def _frames_of(reader: BkpReader, blob: msgspec.Struct) -> set[int]:
    first = reader.frame_of(blob.offset)  # type: ignore[attr-defined]
    last = reader.frame_of(blob.offset + blob.length - 1)  # type: ignore[attr-defined]
    return set(range(first, last + 1))


def _code_of(exc: FormatError | PassphraseError, where: str = "file") -> str:
    for cls, name in ((ChecksumError, "checksum"), (TruncatedError, "truncated"),
                      (UnsupportedVersionError, "unsupported-version"),
                      (UnsupportedFeatureError, "unsupported-feature"), (CorruptError, "corrupt")):
        if isinstance(exc, cls):
            return f"{where}.{name}"
    return f"{where}.error"


def check(path: str | os.PathLike[str], *, deep: bool = False, passphrase: str | None = None) -> Result:
    """Validate (``deep=False``) or verify (``deep=True``) one file. Never
    raises for anything the file holds; a missing file raises OSError. An
    encrypted file without ``passphrase`` gets the checks that need no key."""
    checker = _Checker(Path(path), "verify" if deep else "validate", passphrase)
    checker.fd = os.open(checker.path, os.O_RDONLY)
    try:
        checker.size = checker.result.size = os.fstat(checker.fd).st_size
        try:
            major, minor, file_id = checker.header()
            foot = checker.footer(file_id)
            if foot is None:
                raise _Stop()
            moff, mlen, nframes = foot
            if checker.encrypted:
                if not checker.key_frame(moff):
                    raise _Stop()
                if passphrase is None:
                    checker.sealed_chain(moff, mlen, nframes, deep)
                    raise _Stop()
                m = checker.unsealed_manifest()
            else:
                m = checker.manifest(moff, mlen, major, minor)
            if m is None:
                raise _Stop()
            checker.result.frames = len(m.frames)
            checker.result.attachments = len(m.attachments)
            checker.walk(m, moff, nframes)
            checker.instances = checker.page_entries(m)
            checker.result.instances = len(checker.instances)
            checker.records(m, checker.instances)
            if deep and checker.result.valid:
                checker.deep()
        except _Stop:
            pass
    finally:
        os.close(checker.fd)
    return checker.result


def validate(path: str | os.PathLike[str], passphrase: str | None = None) -> Result:
    return check(path, passphrase=passphrase)


def verify(path: str | os.PathLike[str], passphrase: str | None = None) -> Result:
    return check(path, deep=True, passphrase=passphrase)


def errors(result: Result) -> Iterator[Finding]:
    return (f for f in result.findings if f.severity == ERROR)
