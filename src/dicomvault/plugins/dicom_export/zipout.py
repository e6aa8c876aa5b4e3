"""The zip target: entries streamed into one zip file, ZIP64 when sizes or
counts need it, UTF-8 names flagged as such (Python's zipfile sets bit 11
for non-ASCII names). Each instance passes through a bounded spool (memory
up to 16 MiB, then a temporary file) so that it is verified against its
SHA-256 *before* it becomes an entry; the export as a whole is never copied.
The zip is written as ``NAME.zip.part``, fsynced and renamed when complete.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
import time
import zipfile
from pathlib import Path

from pydicom import Dataset

from dicomvault.engine import (
    ConflictPolicy,
    DicomvaultError,
    Item,
    Outcome,
    ReadAheadTarget,
    TargetError,
    UsageError,
)

from . import convert
from .target import (
    REPORT_NAME,
    Options,
    _Base,
    _verify,
    converted,
    copy_hashed,
    item_error,
    media_uid_problem,
    read_header,
)

SPOOL = 16 << 20
ZIP32_LIMIT = (1 << 31) - 1


def free_zip_name(path: Path) -> Path:
    for n in range(1, 10_000):
        cand = path.with_name(f"{path.stem}_{n}{path.suffix}")
        if not cand.exists():
            return cand
    raise UsageError(f"no free name next to {path}")


class ZipTarget(ReadAheadTarget, _Base):
    def __init__(self, path: str, options: Options, *, level: int = 1) -> None:
        super().__init__(options)
        final = Path(path).expanduser().absolute()
        if final.exists() and not final.is_file():
            # overwrite renames over the name: never a folder, a device, a pipe or a socket
            raise UsageError(f"{path} exists and is not a regular file; it is never replaced")
        if final.exists():
            if options.on_existing == "overwrite":
                pass
            elif options.on_existing == "rename":
                final = free_zip_name(final)
            else:
                raise UsageError(f"{path} exists (--on-existing {options.on_existing}); choose another "
                                 "name, or --on-existing overwrite or rename")
        if not final.parent.is_dir():
            raise UsageError(f"the folder {final.parent} does not exist")
        self.final = final
        self.description = f"zip file {final}"
        self.level = level
        self.part = final.with_name(final.name + ".part")
        self.zf: zipfile.ZipFile | None = None
        self.stamp = time.localtime()[:6]

    def _zip(self) -> zipfile.ZipFile:
        if self.zf is None:
            self.zf = zipfile.ZipFile(self.part, "w", compression=zipfile.ZIP_DEFLATED,
                                      compresslevel=self.level, allowZip64=True)
        return self.zf

    def _entry(self, name: str, src: io.IOBase | tempfile.SpooledTemporaryFile[bytes], size: int) -> None:
        info = zipfile.ZipInfo(name, date_time=self.stamp)  # type: ignore[arg-type]
        info.compress_type = zipfile.ZIP_DEFLATED
        info.file_size = size
        info.external_attr = 0o600 << 16
        with self._zip().open(info, "w", force_zip64=size > ZIP32_LIMIT) as out:
            while chunk := src.read(1 << 20):  # type: ignore[attr-defined]
                out.write(chunk)

    def put_instance(self, item: Item, policy: ConflictPolicy) -> tuple[Outcome, str]:
        seen = self._already(item)
        if seen is not None:
            return seen
        if self.builder is not None and (why := media_uid_problem(item)):
            return Outcome.REJECTED, why
        try:
            return self._put(item)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the zip is broken from here on: stop
                raise TargetError(f"cannot write the zip file {self.final}: {exc.strerror}; nothing was "
                                  "kept under that name") from exc
            raise
        except DicomvaultError:
            raise
        except Exception as exc:  # pydicom on a file it cannot convert or parse
            raise item_error(item, "cannot prepare it for DICOM media", exc) from exc

    def _put(self, item: Item) -> tuple[Outcome, str]:
        with tempfile.SpooledTemporaryFile(SPOOL) as spool, item.open() as src:
            sha, size, source_sha = copy_hashed(src, spool)
            _verify(item, source_sha)
            converted_from = ""
            spool.seek(0)
            head = spool.read(132)
            spool.seek(0)
            if self.builder is not None and convert.needs_conversion(item.instance.transfer_syntax, head):
                conv = tempfile.SpooledTemporaryFile(SPOOL)
                converted_from = convert.to_explicit_le(spool, conv,  # type: ignore[arg-type]
                                                        item.instance.transfer_syntax)
                spool.close()
                spool = conv
                spool.seek(0)
                sha, size, _ = copy_hashed(spool, _Sink())  # type: ignore[arg-type]
            rel = self.layout.path(item)
            spool.seek(0)
            self._entry("/".join(rel), spool, size)  # type: ignore[arg-type]

            def load() -> Dataset:
                spool.seek(0)
                return read_header(spool)  # type: ignore[arg-type]

            self._record(item, rel, sha, size, source_sha, load, converted_from)
            spool.close()
        return converted(converted_from) or (Outcome.STORED, "")

    def finish(self, ok: bool) -> None:
        try:
            if not ok:
                return
            if self.builder is not None:
                buf = io.BytesIO()
                self.builder.write(buf)
                self._zip().writestr(zipfile.ZipInfo("DICOMDIR", self.stamp), buf.getvalue(),
                                     zipfile.ZIP_DEFLATED)
            self._zip().writestr(zipfile.ZipInfo(REPORT_NAME, self.stamp), self._report_bytes(),
                                 zipfile.ZIP_DEFLATED)
            try:
                self._zip().close()
                with open(self.part, "rb+") as fh:
                    os.fsync(fh.fileno())
            except OSError as exc:
                raise TargetError(f"cannot write the zip file {self.final}: {exc.strerror or exc}; nothing "
                                  "was kept under that name") from exc
            os.replace(self.part, self.final)
            self.zf = None
        finally:
            if self.builder is not None:
                self.builder.close()
            if self.zf is not None:
                with contextlib.suppress(OSError):  # a full disk fails the close again: the part goes anyway
                    self.zf.close()
            self.part.unlink(missing_ok=True)


class _Sink:
    def write(self, data: bytes) -> int:
        return len(data)


def open_zip(path: str, options: Options) -> ZipTarget:
    return ZipTarget(path, options)


