"""The export targets: a folder (``dicom-folder:OUTDIR``) and a zip file
(``dicom-zip:FILE.zip``), each optionally with a DICOMDIR.

Options travel in the address as a query (``?layout=...&dicomdir=1&
on-existing=skip&fileset-id=...``, URL-encoded) so that ``transfer --to``
reaches every option too; ``export-dicom`` builds that address.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import Dataset, dcmread

from dicomvault.engine import (
    AttachmentRecord,
    Attributes,
    ConflictPolicy,
    DicomvaultError,
    Item,
    Opener,
    Outcome,
    UsageError,
)

from . import convert
from .dicomdir import DicomdirBuilder, Leaf
from .layout import Layout
from .options import REPORT_NAME, Options

CHUNK = 1 << 20
_UID = re.compile(r"^[012](\.(0|[1-9][0-9]*))+$")


def media_uid_problem(item: Item) -> str:
    """Why the item's UIDs cannot go on DICOM media ('' when they can)."""
    for what, uid in (("Study", item.study.study_uid), ("Series", item.series.series_uid),
                      ("SOP", item.instance.sop_uid)):
        if len(uid) > 64 or not _UID.match(uid):
            return f"its {what} Instance UID is not a valid UID; not written to DICOM media"
    return ""


@dataclass
class Prepared:
    path: Path
    sha256: str  # of the exported bytes
    size: int
    converted_from: str


def copy_hashed(src: Any, dst: Any) -> tuple[str, int, str]:
    """Copy ``src`` to ``dst``; returns (SHA-256, size, source SHA-256)."""
    digest, size = hashlib.sha256(), 0
    while chunk := src.read(CHUNK):
        digest.update(chunk)
        dst.write(chunk)
        size += len(chunk)
    sha = digest.hexdigest()
    return sha, size, sha


def _verify(item: Item, sha: str) -> None:
    if item.instance.sha256 and sha != item.instance.sha256:
        raise OSError(f"instance {item.instance.sop_uid}: the bytes read do not match their SHA-256 "
                      "(stored copy damaged?); not exported")


def read_header(fh: BinaryIO) -> Dataset:
    return dcmread(fh, stop_before_pixels=True, force=True)


def header_loader(path: Path) -> Callable[[], Dataset]:
    def load() -> Dataset:
        with open(path, "rb") as fh:
            return read_header(fh)
    return load


def converted(converted_from: str) -> tuple[Outcome, str] | None:
    """The outcome of a file written in another transfer syntax than stored: its bytes differ from
    the source's, so ``move`` must not take it for a verified copy."""
    if not converted_from:
        return None
    return Outcome.CONVERTED, f"written as Explicit VR Little Endian (stored as {converted_from})"


class ExportError(DicomvaultError):
    """One instance could not be exported (named by UID); the batch goes on."""


def item_error(item: Item, what: str, exc: Exception) -> ExportError:
    return ExportError(f"instance {item.instance.sop_uid}: {what}: {type(exc).__name__}: "
                       f"{' '.join(str(exc).split())[:300]}")


def _load_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_syncfs = _load_syncfs()


class _Base:
    """What the folder and zip targets share: names, the DICOMDIR, the report."""

    description = ""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.layout = Layout(options.template(), dicom_file_ids=options.dicomdir)
        self.builder = DicomdirBuilder(options.fileset_id) if options.dicomdir else None
        self.held: dict[str, str] = {}  # SOP Instance UID -> SHA-256 of the source bytes
        self.entries: dict[str, dict[str, Any]] = {}
        self.warnings: list[str] = []

    def lookup(self, sop_uid: str) -> str | None:
        return self.held.get(sop_uid)

    def _already(self, item: Item) -> tuple[Outcome, str] | None:
        held = self.held.get(item.instance.sop_uid)
        if held is None:
            return None
        if not item.instance.sha256 or held == item.instance.sha256:
            return Outcome.UNCHANGED, ""
        return Outcome.CONFLICT, "the selection holds two different instances with this UID"

    def _record(self, item: Item, rel: list[str], sha: str, size: int, source_sha: str,
                load: Callable[[], Dataset], converted_from: str) -> None:
        rec = item.instance
        self.held[rec.sop_uid] = source_sha
        self.entries[rec.sop_uid] = {
            "path": "/".join(rel), "sha256": sha, "size": size, "source_sha256": source_sha,
            "transfer_syntax": convert.ExplicitVRLittleEndian if converted_from else rec.transfer_syntax,
            "converted_from": converted_from or None,
            "study_uid": item.study.study_uid, "series_uid": item.series.series_uid}
        if self.builder is not None:
            ts = convert.ExplicitVRLittleEndian if converted_from else rec.transfer_syntax
            leaf = Leaf(rec.sop_uid, rec.sop_class_uid, item.series.series_uid, item.series.modality,
                        rec.number, ts, item.patient.key)
            try:
                filled = self.builder.add(leaf, rel, load)
            except (ValueError, KeyError, AttributeError) as exc:
                self.warnings.append(f"instance {rec.sop_uid}: exported but not in the DICOMDIR: "
                                     f"{' '.join(str(exc).split())}")
                return
            if filled:
                self.warnings.append(f"instance {rec.sop_uid}: DICOMDIR record keys filled by rule: "
                                     f"{', '.join(filled)}")

    def _report_bytes(self) -> bytes:
        doc = {"format": "dicomvault-export-report", "version": 1,
               "layout": self.layout.template,
               "dicomdir": "DICOMDIR" if self.builder is not None else None,
               "instances": dict(sorted(self.entries.items(), key=lambda kv: kv[1]["path"])),
               "warnings": self.warnings}
        return json.dumps(doc, indent=1, ensure_ascii=False).encode("utf-8") + b"\n"

    def put_attributes(self, attrs: Attributes, policy: ConflictPolicy) -> tuple[Outcome, str]:
        return Outcome.IGNORED, "database attributes are not part of a DICOM export"

    def put_attachment(self, record: AttachmentRecord, open_: Opener,
                       policy: ConflictPolicy) -> tuple[Outcome, str]:
        return Outcome.IGNORED, "attachments are not part of a DICOM export"

    def plan_attributes(self, attrs: Attributes, policy: ConflictPolicy) -> tuple[Outcome, str]:
        return self.put_attributes(attrs, policy)

    def plan_attachment(self, record: AttachmentRecord, policy: ConflictPolicy) -> tuple[Outcome, str]:
        return Outcome.IGNORED, "attachments are not part of a DICOM export"


class FolderTarget(_Base):
    """Files under OUTDIR; each written under a temporary name and renamed
    into place; one ``syncfs`` (elsewhere: fsync per file) before the
    DICOMDIR and the report are written, atomically, last."""

    def __init__(self, root: str, options: Options) -> None:
        super().__init__(options)
        self.root = Path(root).expanduser().absolute()
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"{root} exists and is not a folder")
        self.description = f"DICOM folder {root}"
        self._lock = threading.Lock()
        self._staging: Path | None = None
        self._real_root: str | None = None
        self._dirs: set[Path] = set()
        self._fresh: set[Path] = set()  # folders this run created: they hold only what it put there
        self.touched = False

    # -- paths that never leave OUTDIR
    def _stage_dir(self) -> Path:
        with self._lock:
            if self._staging is None:
                self.root.mkdir(parents=True, exist_ok=True)
                self._real_root = os.path.realpath(self.root)
                self._staging = Path(tempfile.mkdtemp(prefix=".dicomvault-export-", dir=self.root))
            return self._staging

    def _inside(self, path: Path) -> bool:
        assert self._real_root is not None
        real = os.path.realpath(path)
        return real == self._real_root or real.startswith(self._real_root + os.sep)

    def _make_parent(self, dest: Path) -> None:
        """Create the folders above ``dest`` one level at a time, refusing any
        level that is a symbolic link or not a folder (nothing planted in
        OUTDIR can lead the export elsewhere)."""
        parent = dest.parent
        if parent in self._dirs:
            return
        current = self.root
        for part in parent.relative_to(self.root).parts:
            current = current / part
            if current in self._dirs:
                continue
            try:
                current.mkdir()
                self._fresh.add(current)
            except FileExistsError:
                if current.is_symlink() or not current.is_dir():
                    # paths below the output folder are not shown: the layout may put names in them
                    raise OSError("a folder of its path is a symbolic link or not a folder: it could lead "
                                  "outside the output folder; not written") from None
            self._dirs.add(current)
        if not self._inside(parent):
            raise OSError("its folder leads outside the output folder; not written")

    def destination(self, rel: list[str]) -> Path:
        dest = self.root.joinpath(*rel)
        if ".." in rel or any(os.sep in c or "/" in c for c in rel):
            raise OSError("refusing its path: a component is '..' or holds a separator")
        return dest

    # -- the run loop's parallel protocol
    def prepare(self, item: Item, policy: ConflictPolicy) -> Prepared:
        staging = self._stage_dir()
        tmp = staging / f"{uuid.uuid4().hex}.part"
        converted_from = ""
        with item.open() as src, open(tmp, "wb") as out:
            first = _Head(out)
            sha, size, source_sha = copy_hashed(src, first)
            if _syncfs is None:
                out.flush()
                os.fsync(out.fileno())
        try:
            _verify(item, source_sha)
            if self.builder is not None:
                if convert.needs_conversion(item.instance.transfer_syntax, first.head):
                    conv = tmp.with_suffix(".conv")
                    with open(tmp, "rb") as src, open(conv, "wb") as out:
                        converted_from = convert.to_explicit_le(src, out, item.instance.transfer_syntax)
                    os.replace(conv, tmp)
                    with open(tmp, "rb") as fh:
                        sha, size, _ = copy_hashed(fh, _Null())
            prepared = Prepared(tmp, sha, size, converted_from)
            prepared.source_sha = source_sha  # type: ignore[attr-defined]
            return prepared
        except (DicomvaultError, OSError):
            tmp.unlink(missing_ok=True)
            raise
        except Exception as exc:  # pydicom on a file it cannot convert or parse
            tmp.unlink(missing_ok=True)
            raise item_error(item, "cannot prepare it for DICOM media", exc) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def discard(self, prepared: Prepared | None) -> None:
        if prepared is not None:
            prepared.path.unlink(missing_ok=True)

    def put_instance(self, item: Item, policy: ConflictPolicy) -> tuple[Outcome, str]:
        return self.put_prepared(item, self.prepare(item, policy), policy)

    def _existing(self, dest: Path, sha: str) -> bool:
        """Whether ``dest`` holds exactly the bytes with this SHA-256."""
        digest = hashlib.sha256()
        with open(dest, "rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest() == sha

    def put_prepared(self, item: Item, prepared: Prepared, policy: ConflictPolicy) -> tuple[Outcome, str]:
        placed = False
        try:
            seen = self._already(item)
            if seen is not None:
                return seen
            if self.builder is not None and (why := media_uid_problem(item)):
                return Outcome.REJECTED, why
            rel = self.layout.path(item)
            dest = self.destination(rel)
            self._make_parent(dest)
            outcome = Outcome.STORED
            # the layout never gives two instances one name, so only a folder this run
            # did not create can hold something under it already
            if dest.parent not in self._fresh and os.path.lexists(dest):
                mode = self.options.on_existing
                if dest.is_symlink() or not dest.is_file():
                    return Outcome.CONFLICT, "its destination exists and is not a plain file; left untouched"
                if self._existing(dest, prepared.sha256):
                    self._record(item, rel, prepared.sha256, prepared.size,
                                 getattr(prepared, "source_sha", prepared.sha256), header_loader(dest),
                                 prepared.converted_from)
                    return converted(prepared.converted_from) or (Outcome.UNCHANGED, "")
                if mode == "overwrite":
                    outcome = Outcome.OVERWRITTEN
                elif mode == "rename":
                    rel = self._free_name(rel)
                    dest = self.destination(rel)
                else:
                    return Outcome.CONFLICT, ("its destination file exists with other content; left "
                                              f"untouched (--on-existing {mode})")
            os.replace(prepared.path, dest)
            placed = True
            self.touched = True
            self._record(item, rel, prepared.sha256, prepared.size,
                         getattr(prepared, "source_sha", prepared.sha256), header_loader(dest),
                         prepared.converted_from)
            return converted(prepared.converted_from) or (outcome, "")
        finally:
            if not placed:
                prepared.path.unlink(missing_ok=True)

    def _free_name(self, rel: list[str]) -> list[str]:
        from . import naming

        for n in range(1, 10_000):
            tag = str(n)
            last = (naming.file_id_with_suffix(rel[-1], tag) if self.options.dicomdir
                    else naming.with_suffix(rel[-1], tag))
            cand = [*rel[:-1], last]
            if not os.path.lexists(self.destination(cand)):
                self.layout.names.reserve("/".join(rel[:-1]), last, "renamed")
                return cand
        raise OSError("no free name next to its destination file")

    def _write_atomic(self, name: str, data: bytes) -> None:
        dest = self.root / name
        if dest.is_symlink():
            raise OSError(f"{dest} is a symbolic link; not written")
        tmp = self.root / f".{name}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)

    def finish(self, ok: bool) -> None:
        staging = self._staging
        try:
            if ok and staging is None and not self.entries:
                return  # nothing selected: leave no trace
            if ok:
                self._stage_dir()
                if _syncfs is not None:
                    fd = os.open(self.root, os.O_RDONLY)
                    try:
                        _syncfs(fd)
                    finally:
                        os.close(fd)
                if self.builder is not None:
                    self.builder.write_atomic(self.root / "DICOMDIR")
                self._write_atomic(REPORT_NAME, self._report_bytes())
                fd = os.open(self.root, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        finally:
            if self.builder is not None:
                self.builder.close()
            staging = self._staging
            if staging is not None:
                for leftover in staging.iterdir():
                    leftover.unlink(missing_ok=True)
                staging.rmdir()


class _Null:
    def write(self, data: bytes) -> int:
        return len(data)


class _Head:
    """Writes through to ``out`` and keeps the first 132 bytes (preamble and
    ``DICM``: whether the file is a Part 10 file)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.head = b""

    def write(self, data: bytes) -> int:
        if len(self.head) < 132:
            self.head += data[: 132 - len(self.head)]
        return self.out.write(data)
