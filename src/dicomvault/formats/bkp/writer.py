"""Streaming .bkp writer.

Blobs (instance files, attachments) are appended to one logical payload
stream that is cut into independent frames of ``frame_size`` bytes. Frames
are compressed by zstd in worker threads (zstandard releases the GIL, so
the C code runs in parallel) while the caller keeps reading input; at most
two frames per thread are in flight, so memory stays flat whatever the size
of the backup. The file is written under a temporary name in the target
directory, fsynced, renamed, and the directory fsynced.
"""
from __future__ import annotations

import collections
import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import zstandard

from dicomvault.engine import TargetError, writer_is_gone, writer_tag

from .crypto import DEFAULT_LOG2_N, MAX_SEALED_CONTENT, FrameCipher, new_key_frame
from .layout import (
    CODEC_NONE,
    CODEC_ZSTD,
    FLAG_ENCRYPTED,
    FRAME_DATA,
    FRAME_KEY,
    FRAME_MANIFEST,
    FRAME_PAGE,
    MAJOR,
    MINOR,
    PAGE_SEQ_BASE,
    pack_footer,
    pack_frame_header,
    pack_header,
    xxh3,
)
from .manifest import (
    FEATURE_ENCRYPTION,
    FEATURE_PAGES,
    Blob,
    FrameEntry,
    InstanceEntry,
    Manifest,
    PageEntry,
    encoder,
    page_decoder,
)
from .reader import decompress

FRAME_SIZE = 4 << 20
READ_CHUNK = 1 << 20
_local = threading.local()


def _compress(raw: bytes | bytearray, level: int, cipher: FrameCipher | None = None, ftype: int = FRAME_DATA,
              seq: int = 0) -> tuple[int, bytes | bytearray, int]:
    """(codec, payload, xxh3 of payload); stores raw when zstd does not help.
    With ``cipher``, the (compressed) content is then sealed as frame ``seq`` of type ``ftype``."""
    comp = getattr(_local, "zstd", None)
    if comp is None or _local.level != level:
        comp = _local.zstd = zstandard.ZstdCompressor(level=level, write_checksum=True,
                                                      write_content_size=True)
        _local.level = level
    packed = comp.compress(raw)
    codec, payload = (CODEC_NONE, raw) if len(packed) >= len(raw) else (CODEC_ZSTD, packed)
    if cipher is not None:
        payload = cipher.seal(ftype, codec, seq, len(raw), payload)
    return codec, payload, xxh3(payload)


def remove_leftovers(final: Path) -> None:
    """Remove the temporary files that writers of ``final`` killed before the
    end left beside it (``.NAME.HOST.PID.RANDOM.part``, see
    :func:`~dicomvault.engine.writer_tag`): only those of a process of this
    host that no longer runs; a running export's file is never touched."""
    prefix = f".{final.name}."
    try:
        entries = list(os.scandir(final.parent))
    except OSError:
        return  # the writer's own open says what is wrong
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".part")):
            continue
        tag = name[len(prefix):-len(".part")].rpartition(".")[0]  # drop the random part
        if writer_is_gone(tag) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BkpWriter:
    def __init__(self, path: str | os.PathLike[str], *, writer: str, level: int = 3,
                 frame_size: int = FRAME_SIZE, threads: int | None = None, passphrase: str | None = None,
                 kdf_log2_n: int = DEFAULT_LOG2_N) -> None:
        """With ``passphrase``, the file is encrypted (SPEC.md section 17); the key
        derivation (scrypt, N = 2^kdf_log2_n) runs here, once."""
        self.final = Path(path)
        self.level = level
        if passphrase is not None and not 1 <= frame_size <= MAX_SEALED_CONTENT:
            raise ValueError(f"an encrypted frame holds at most {MAX_SEALED_CONTENT} bytes")
        self.frame_size = frame_size
        self.file_id = os.urandom(16)
        self.cipher: FrameCipher | None = None
        key_frame = b""
        if passphrase is not None:  # before the temporary file exists: a bad passphrase leaves nothing
            key_frame, self.cipher = new_key_frame(passphrase, self.file_id, log2_n=kdf_log2_n)
        self.threads = threads or max(1, min(4, os.cpu_count() or 1))
        self.writer_name = writer
        remove_leftovers(self.final)
        fd, tmp = tempfile.mkstemp(dir=self.final.parent, prefix=f".{self.final.name}.{writer_tag()}.",
                                   suffix=".part")
        self.tmp = Path(tmp)
        self.fh = os.fdopen(fd, "wb", buffering=1 << 20)
        # 1.1 from the start, pages or not: the header is never rewritten (SPEC.md section 9)
        self.fh.write(pack_header(self.file_id, time.time_ns(), FLAG_ENCRYPTED if self.cipher else 0))
        self.pos = 64
        if self.cipher is not None:  # the key frame: stored as is, not encrypted, not in the index
            self.fh.write(pack_frame_header(FRAME_KEY, CODEC_NONE, 0, len(key_frame), len(key_frame),
                                            xxh3(key_frame)))
            self.fh.write(key_frame)
            self.pos += 48 + len(key_frame)
        # The open frame: read into directly (no copy), handed to a worker when full, and
        # reused once its frame is written (no allocation per frame either).
        self.buf = bytearray(self.frame_size)
        self.fill = 0
        self.spare: list[bytearray] = []
        self.stream_pos = 0  # bytes appended to the payload stream so far
        self.cut_pos = 0  # payload stream offset where the open frame starts
        self.frames: list[FrameEntry] = []
        self.pages: list[PageEntry] = []
        self.submitted = 0  # data frames handed to the pool: the next one's seq
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="bkp-zstd")
        self.pending: collections.deque[tuple[Future[tuple[int, bytes | bytearray, int]], bytearray, int]] = \
            collections.deque()
        self.closed = False
        self.failed: TargetError | None = None  # once a write failed, every later call fails too

    def _fail(self, exc: OSError) -> TargetError:
        """A write to the file failed: the bytes that did not make it cannot
        be put back, so the file is lost. Said once, clearly, and for good."""
        if self.failed is None:
            self.failed = TargetError(f"cannot write the backup file {self.final}: "
                                      f"{exc.strerror or exc}; nothing was kept under that name")
        return self.failed

    def _write(self, data: bytes | bytearray) -> None:
        if self.failed is not None:
            raise self.failed
        try:
            self.fh.write(data)
        except OSError as exc:
            raise self._fail(exc) from exc

    # ------------------------------------------------------------ payload
    def add_blob(self, stream: BinaryIO, tap: object = None) -> Blob:
        """Append everything ``stream`` yields; ``tap(chunk)`` sees each chunk
        (to hash it on the way)."""
        if self.failed is not None:
            raise self.failed
        start = self.stream_pos
        readinto = getattr(stream, "readinto", None)
        while True:
            if self.fill == self.frame_size:
                self._cut()
            want = min(READ_CHUNK, self.frame_size - self.fill)
            if readinto is not None:
                with memoryview(self.buf)[self.fill:self.fill + want] as view:
                    n = readinto(view) or 0
                    if n and tap is not None:
                        tap(view[:n])  # type: ignore[operator]
            else:
                chunk = stream.read(want)
                n = len(chunk)
                self.buf[self.fill:self.fill + n] = chunk
                if n and tap is not None:
                    tap(chunk)  # type: ignore[operator]
            if not n:
                break
            self.fill += n
            self.stream_pos += n
        return Blob(start, self.stream_pos - start)

    def _cut(self) -> None:
        if not self.fill:
            return
        if self.fill == self.frame_size:
            raw, self.buf = self.buf, (self.spare.pop() if self.spare else bytearray(self.frame_size))
        else:  # a last, partial frame (end of the file, or of a volume)
            raw = self.buf[:self.fill]
        self.fill = 0
        future = self.pool.submit(_compress, raw, self.level, self.cipher, FRAME_DATA, self.submitted)
        self.submitted += 1
        self.pending.append((future, raw, self.cut_pos))
        self.cut_pos += len(raw)
        while len(self.pending) > 2 * self.threads:
            self._drain_one()

    def _drain_one(self) -> None:
        future, raw, stream_offset = self.pending.popleft()
        codec, payload, check = future.result()
        seq = len(self.frames)
        self._write(pack_frame_header(FRAME_DATA, codec, seq, len(payload), len(raw), check))
        self._write(payload)
        self.frames.append(FrameEntry(self.pos, len(payload), len(raw), codec, stream_offset))
        self.pos += 48 + len(payload)
        if len(raw) == self.frame_size and len(self.spare) < 2:
            self.spare.append(raw)  # written (it may have been the payload itself): free to reuse

    def settle(self) -> None:
        """Write the frames still being compressed, so that ``pos`` counts all
        but the open frame at their stored size (volume sets decide on it)."""
        while self.pending:
            self._drain_one()

    # ------------------------------------------------------------ manifest pages
    def add_page(self, entries: list[InstanceEntry]) -> None:
        """Write instance entries out as a page frame (SPEC.md section "Manifest
        pages"), so that they need not be kept until the manifest: the caller
        drops them."""
        if self.failed is not None:
            raise self.failed
        if not entries:
            return
        raw = encoder.encode(entries)
        seq = PAGE_SEQ_BASE + len(self.pages)
        codec, payload, check = _compress(raw, self.level, self.cipher, FRAME_PAGE, seq)
        self._write(pack_frame_header(FRAME_PAGE, codec, seq, len(payload), len(raw), check))
        self._write(payload)
        series = list(dict.fromkeys(e.record.series_uid for e in entries))
        self.pages.append(PageEntry(self.pos, len(payload), len(raw), codec, len(entries), series))
        self.pos += 48 + len(payload)

    def written_entries(self) -> Iterator[InstanceEntry]:
        """The entries of the pages written so far, read back from the file a
        page at a time (for the rare question whether an instance was written
        already)."""
        try:
            self.fh.flush()
        except OSError as exc:
            raise self._fail(exc) from exc
        for k, page in enumerate(self.pages):
            payload = os.pread(self.fh.fileno(), page.stored, page.offset + 48)
            if self.cipher is not None:
                payload = self.cipher.open(FRAME_PAGE, page.codec, PAGE_SEQ_BASE + k, page.raw, payload,
                                           f"page {k}")
            yield from page_decoder.decode(decompress(payload, page.codec, page.raw, f"page {k}"))

    # ------------------------------------------------------------ finishing
    def finish(self, manifest: Manifest) -> Path:
        """Write the manifest and footer, make the file durable, rename it."""
        if self.failed is not None:
            raise self.failed
        self._cut()
        while self.pending:
            self._drain_one()
        self.pool.shutdown()
        manifest.major, manifest.minor = MAJOR, MINOR
        manifest.writer = self.writer_name
        manifest.created = manifest.created or datetime.now(UTC).isoformat(timespec="seconds")
        manifest.frames = self.frames
        if self.cipher is not None and FEATURE_ENCRYPTION not in manifest.required_features:
            manifest.required_features = [*manifest.required_features, FEATURE_ENCRYPTION]
        if self.pages:
            manifest.pages = self.pages
            if FEATURE_PAGES not in manifest.required_features:
                manifest.required_features = [*manifest.required_features, FEATURE_PAGES]
        raw = encoder.encode(manifest)
        codec, payload, check = _compress(raw, self.level, self.cipher, FRAME_MANIFEST, len(self.frames))
        manifest_offset = self.pos
        self._write(pack_frame_header(FRAME_MANIFEST, codec, len(self.frames), len(payload), len(raw),
                                      check))
        self._write(payload)
        self.pos += 48 + len(payload)
        self._write(pack_footer(manifest_offset, 48 + len(payload), len(self.frames), self.file_id))
        try:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
        except OSError as exc:  # a full disk often shows only here (delayed allocation, NFS)
            raise self._fail(exc) from exc
        if self.final.exists() and not self.final.is_file():  # never rename over a device or a pipe
            raise TargetError(f"{self.final} exists and is not a regular file; it is never replaced")
        os.replace(self.tmp, self.final)
        self.closed = True  # only now: if the rename fails, abort() must still remove the temporary file
        fsync_dir(self.final.parent)
        return self.final

    def abort(self) -> None:
        """Drop everything: no file appears under the final name."""
        if self.closed:
            return
        self.closed = True
        self.pool.shutdown(cancel_futures=True)
        try:
            # closing flushes the buffer, which fails again on a full disk; the
            # file descriptor is closed all the same, and the file goes
            with contextlib.suppress(OSError):
                self.fh.close()
        finally:
            try:
                self.tmp.unlink()
            except FileNotFoundError:
                pass
