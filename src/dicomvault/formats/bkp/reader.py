"""Random-access .bkp reader.

Opening reads the header, the footer and the manifest only. A blob is read
by decompressing just the frames that hold it, one at a time; the last
frame stays cached because neighbouring blobs share it. Every frame is
checked against its checksum before use.
"""
from __future__ import annotations

import bisect
import collections
import io
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import msgspec
import zstandard

from dicomvault.engine import (
    ChecksumError,
    CorruptError,
    DicomvaultError,
    FormatError,
    PassphraseRequiredError,
    TruncatedError,
    UnsupportedFeatureError,
    UnsupportedVersionError,
    WrongPassphraseError,
)

from .crypto import TAG_SIZE, FrameCipher, open_key_frame
from .layout import (
    CODEC_NONE,
    CODEC_ZSTD,
    FLAG_ENCRYPTED,
    FOOTER,
    FRAME,
    FRAME_DATA,
    FRAME_KEY,
    FRAME_MANIFEST,
    FRAME_PAGE,
    HEADER,
    MAJOR,
    PAGE_SEQ_BASE,
    parse_header,
    unpack_footer,
    unpack_frame_header,
    xxh3,
)
from .manifest import (
    FEATURE_ENCRYPTION,
    FEATURE_PAGES,
    KNOWN_FEATURES,
    Blob,
    InstanceEntry,
    Manifest,
    PageEntry,
    decoder,
    page_decoder,
)

MAX_MANIFEST = 1 << 32  # refuse to allocate more than this from a length field
ONE_SHOT = 64 << 20  # frames announcing up to this decompress into one buffer of the announced size
CACHED_FRAMES = 12
READ_AHEAD = 3  # planned frames decoded ahead of the reader, in the background


class BkpOpenError(DicomvaultError):
    """The file cannot be opened at all (missing, unreadable)."""


class BkpReader:
    """An open .bkp file. ``passphrase`` opens an encrypted one (it is ignored
    for a file that is not encrypted); without it an encrypted file raises
    ``PassphraseRequiredError``, with a wrong one ``WrongPassphraseError``."""

    def __init__(self, path: str | os.PathLike[str], passphrase: str | None = None, *,
                 check_blobs: bool = True) -> None:
        """``check_blobs=False`` skips the bounds and size checks of the manifest's
        own blobs on opening (the validator reports them itself, and still wants
        the pages read)."""
        self.path = Path(path)
        self._check_blobs_on_open = check_blobs
        try:
            self.fh: BinaryIO = open(self.path, "rb")
        except OSError as exc:  # missing, unreadable, a directory: not a statement about the format
            raise BkpOpenError(f"cannot open {self.path}: {exc.strerror}") from exc
        self._frames: dict[int, _Slot] = {}  # small cache, least recently used first
        self._lock = threading.Lock()  # blobs are read from several threads at once
        self.bytes_read = 0
        self._plan: list[int] = []  # frames a caller will read, in order (see plan())
        self._wanted: collections.Counter[int] = collections.Counter()  # planned blobs yet to read each frame
        self._ahead: ThreadPoolExecutor | None = None
        self._cipher: FrameCipher | None = None
        try:
            self._open(passphrase)
        except BaseException:
            self.fh.close()
            raise

    def _open(self, passphrase: str | None) -> None:
        fd = self.fh.fileno()
        self.size = os.fstat(fd).st_size
        # positioned reads of exactly what is needed: no read-ahead into the frames
        header = parse_header(_pread(fd, HEADER.size, 0))
        self.major, self.minor, self.file_id, self.created = (header.major, header.minor, header.file_id,
                                                              header.created)
        self.encrypted = bool(header.flags & FLAG_ENCRYPTED)
        if self.size < HEADER.size + FOOTER.size:
            raise TruncatedError(f"truncated .bkp file {self.path.name}: too short to hold a footer")
        moff, mlen, nframes, file_id = unpack_footer(_pread(fd, FOOTER.size, self.size - FOOTER.size))
        if file_id != self.file_id:
            raise CorruptError("header and footer belong to different .bkp files")
        if not (HEADER.size <= moff and moff + mlen <= self.size - FOOTER.size and mlen >= FRAME.size):
            raise CorruptError("the footer points outside the file")
        self.data_start = HEADER.size  # where the first data frame may start
        if self.encrypted:
            self.data_start = self._open_key_frame(moff, passphrase)
            if moff < self.data_start:
                raise CorruptError("the footer points inside the key frame")
        ftype, codec, seq, stored, raw, check = unpack_frame_header(_pread(fd, FRAME.size, moff), moff)
        if ftype != FRAME_MANIFEST or stored != mlen - FRAME.size:
            raise CorruptError("the footer does not point at the manifest frame")
        if self._cipher is not None and seq != nframes:
            raise CorruptError(f"the manifest frame has seq {seq}, the footer counts {nframes} data frames")
        if raw > MAX_MANIFEST:
            raise CorruptError(f"manifest length {raw} is implausible")
        payload = _pread(fd, stored, moff + FRAME.size)
        if len(payload) != stored:
            raise TruncatedError("truncated .bkp file: the manifest is incomplete")
        if xxh3(payload) != check:
            raise ChecksumError("the manifest frame is damaged (checksum mismatch)")
        data = self._decode(payload, codec, raw, "the manifest", ftype=FRAME_MANIFEST, seq=seq)
        try:
            self.manifest: Manifest = decoder.decode(data)
        except msgspec.MsgspecError as exc:
            raise CorruptError(f"the manifest cannot be decoded: {exc}") from exc
        m = self.manifest
        if m.major != MAJOR:
            raise UnsupportedVersionError(f"the manifest has format version {m.major}.{m.minor}; "
                                          f"this release reads major version {MAJOR}")
        unknown = [f for f in m.required_features if f not in KNOWN_FEATURES]
        if unknown:
            raise UnsupportedFeatureError("this .bkp file needs feature(s) this release does not "
                                          "implement: " + ", ".join(unknown))
        if (FEATURE_ENCRYPTION in m.required_features) != self.encrypted:
            raise CorruptError("the header and the manifest disagree on whether the file is encrypted")
        if len(m.frames) != nframes:
            raise CorruptError("the footer and the manifest disagree on the number of frames")
        expected = 0
        for i, fe in enumerate(m.frames):
            if fe.stream_offset != expected or fe.offset < self.data_start or \
                    fe.offset + FRAME.size + fe.stored > moff:
                raise CorruptError(f"frame {i} has an inconsistent index entry")
            expected += fe.raw
        self.stream_size = expected
        self._starts = [fe.stream_offset for fe in m.frames]
        self.pages: list[PageEntry] = m.pages if isinstance(m.pages, list) else []
        listed = FEATURE_PAGES in m.required_features
        if isinstance(m.pages, list) and not listed:
            raise CorruptError(f"the manifest has a page index but does not list the feature {FEATURE_PAGES}")
        if listed and not self.pages:
            raise CorruptError(f"the manifest lists the feature {FEATURE_PAGES} but has no pages")
        for k, page in enumerate(self.pages):
            if page.offset < self.data_start or page.offset + FRAME.size + page.stored > moff \
                    or page.count < 1:
                raise CorruptError(f"page {k} has an inconsistent index entry")
        if not self._check_blobs_on_open:
            return
        for e in m.instances:
            self._check_blob(f"instance {e.record.sop_uid}", e.blob, e.record.size)
        for a in m.attachments:
            self._check_blob(f"attachment {a.record.attachment_id}", a.blob, a.record.size)

    def _check_blob(self, what: str, blob: Blob, size: int) -> None:
        if blob.offset < 0 or blob.length < 0 or blob.offset + blob.length > self.stream_size:
            raise CorruptError(f"{what}: its blob points outside the payload")
        if size != blob.length:
            raise CorruptError(f"{what}: its record says {size} bytes, its blob {blob.length}")

    # ------------------------------------------------------------ instances
    @property
    def instance_count(self) -> int:
        return len(self.manifest.instances) + sum(p.count for p in self.pages)

    def iter_instances(self, series: set[str] | frozenset[str] | None = None) -> Iterator[InstanceEntry]:
        """Every instance entry, or those of ``series``, in file order. Memory
        holds one page of them at a time, never all (see :meth:`instance_chunks`)."""
        for chunk in self.instance_chunks(series):
            yield from chunk

    def instance_chunks(self, series: set[str] | frozenset[str] | None = None, *,
                        damaged: list[tuple[int, FormatError]] | None = None
                        ) -> Iterator[list[InstanceEntry]]:
        """The instance entries (of ``series`` only, if given) a list at a time:
        the manifest's own, then one list per page (SPEC.md "Manifest pages").
        A page whose index names none of ``series`` is not read. A damaged
        page raises, or, with ``damaged``, is noted there (page number, error)
        and skipped."""
        own = [e for e in self.manifest.instances if series is None or e.record.series_uid in series]
        if own:
            yield own
        for k, page in enumerate(self.pages):
            if series is not None and series.isdisjoint(page.series):
                continue
            try:
                entries = self.read_page(k)
            except FormatError as exc:
                if damaged is None:
                    raise
                damaged.append((k, exc))
                continue
            chunk = [e for e in entries if series is None or e.record.series_uid in series]
            if chunk:
                yield chunk

    def read_page(self, k: int) -> list[InstanceEntry]:
        """The entries of page ``k``, checked (SPEC.md section "Manifest pages");
        the format's errors name the page."""
        page = self.pages[k]
        if page.raw > MAX_MANIFEST:
            raise CorruptError(f"page {k}: length {page.raw} is implausible")
        data = self._read_indexed_frame(f"page {k}", page.offset, FRAME_PAGE, PAGE_SEQ_BASE + k,
                                        page.stored, page.raw, page.codec)
        try:
            entries = page_decoder.decode(data)
        except msgspec.MsgspecError as exc:
            raise CorruptError(f"page {k} cannot be decoded: {exc}") from exc
        if len(entries) != page.count:
            raise CorruptError(f"page {k} holds {len(entries)} entries, its index says {page.count}")
        named = set(page.series)
        for e in entries:
            self._check_blob(f"page {k}: instance {e.record.sop_uid}", e.blob, e.record.size)
            if e.record.series_uid not in named:
                raise CorruptError(f"page {k}: instance {e.record.sop_uid} is of a series its index "
                                   "does not name")
        return entries

    def _open_key_frame(self, moff: int, passphrase: str | None) -> int:
        """Reads and checks the key frame, derives the key; returns the offset after the frame."""
        where, fd = HEADER.size, self.fh.fileno()
        ftype, codec, seq, stored, raw, check = unpack_frame_header(_pread(fd, FRAME.size, where), where)
        if ftype != FRAME_KEY or codec != CODEC_NONE or seq != 0 or stored != raw:
            raise CorruptError(f"the header says encrypted, but offset {where} holds no key frame")
        end = where + FRAME.size + stored
        if end > moff:
            raise CorruptError("the key frame overlaps the manifest frame")
        payload = _pread(fd, stored, where + FRAME.size)
        if len(payload) != stored:
            raise TruncatedError("truncated .bkp file: the key frame is incomplete")
        if xxh3(payload) != check:
            raise ChecksumError("the key frame is damaged (checksum mismatch)")
        if passphrase is None:
            raise PassphraseRequiredError(
                f"{self.path.name} is encrypted: give its passphrase (--passphrase-env VAR, "
                "--passphrase-file PATH, or run in a terminal to be asked for it)")
        self._cipher = open_key_frame(payload, passphrase, self.file_id)
        return end

    def _decode(self, payload: bytes, codec: int, raw: int, what: str, *, ftype: int = FRAME_DATA,
                seq: int = 0) -> bytes:
        """The content of a frame's payload: decrypted (encrypted files), decompressed, size-checked."""
        if self._cipher is not None:
            if codec == CODEC_NONE and len(payload) != raw + TAG_SIZE:
                raise CorruptError(f"{what} stores {len(payload)} bytes for {raw} bytes of content")
            payload = self._cipher.open(ftype, codec, seq, raw, payload, what)
        return decompress(payload, codec, raw, what)

    def plan(self, blobs: Iterable[Blob]) -> None:
        """Announce the blobs about to be read, in order: the frames they need
        are then decoded a little ahead, in background threads (zstd
        releases the GIL), so readers rarely wait. Frames no planned blob
        needs are never read."""
        wanted: collections.Counter[int] = collections.Counter()
        for blob in blobs:
            if blob.length:
                last = self.frame_of(blob.offset + blob.length - 1)
                wanted.update(range(self.frame_of(blob.offset), last + 1))
        with self._lock:
            self._wanted = wanted
        self._plan = sorted(wanted)
        if self._plan and self._ahead is None:
            self._ahead = ThreadPoolExecutor(2, thread_name_prefix="bkp-read-ahead")

    def _new_slot(self, index: int) -> _Slot:
        """A slot for ``index`` in the cache, to be filled by its owner (call under the lock)."""
        slot = self._frames[index] = _Slot()
        if len(self._frames) > CACHED_FRAMES:
            # First frames no planned blob still needs, then frames readers have used, then
            # frames decoded ahead that no reader asked for yet, each least recently used first;
            # never one still being decoded. Dropping a frame decoded ahead, or one a slower
            # worker still needs, would have it decoded again (a thrash).
            ready = [(self._wanted[i] > 0, not s.used, i) for i, s in self._frames.items()
                     if s.ready.is_set()]
            for *_order, old in sorted(ready, key=lambda r: r[:2]):  # stable: LRU order kept
                del self._frames[old]
                if len(self._frames) <= CACHED_FRAMES:
                    break
        return slot

    def _read_ahead(self, index: int) -> None:
        if self._ahead is None:
            return
        at = bisect.bisect_right(self._plan, index)
        for nxt in self._plan[at:at + READ_AHEAD]:
            # The slot is taken when the task is queued, not when it starts: a frame is queued
            # once, and no worker sits waiting for a frame another worker decodes.
            with self._lock:
                if nxt in self._frames or not self._wanted[nxt]:
                    continue  # cached, or every planned blob is done with it (a slower reader's view)
                if sum(not s.used for s in self._frames.values()) >= CACHED_FRAMES // 2:
                    return  # enough decoded ahead: more would push out frames decoded ahead earlier
                slot = self._new_slot(nxt)
            try:
                self._ahead.submit(self._fill_quietly, slot, nxt)
            except RuntimeError:  # closed meanwhile
                self._abandon(slot, nxt)
                return

    def _fill_quietly(self, slot: _Slot, index: int) -> None:
        try:
            self._fill(slot, index)
        except DicomvaultError:
            pass  # the reader that needs the frame gets the error itself

    def _fill(self, slot: _Slot, index: int) -> bytes:
        try:
            slot.data = self._load_frame(index)
        except BaseException as exc:
            slot.error = exc
            with self._lock:
                if self._frames.get(index) is slot:
                    del self._frames[index]
            raise
        finally:
            slot.ready.set()
        return slot.data

    def _abandon(self, slot: _Slot, index: int) -> None:
        """A queued frame that will not be decoded: whoever waits for it gets an error."""
        slot.error = DicomvaultError(f"frame {index} was not read: the backup file was closed")
        with self._lock:
            if self._frames.get(index) is slot:
                del self._frames[index]
        slot.ready.set()

    def read_frame(self, index: int, *, ahead: bool = True) -> bytes:
        """The content of data frame ``index``, verified.

        Thread-safe. A few recent frames stay cached; when several threads
        want the same frame, one decodes it and the others wait for it, so
        different frames decompress in parallel (zstd releases the GIL).
        """
        with self._lock:
            slot = self._frames.pop(index, None)
            owner = slot is None
            if slot is None:
                slot = self._new_slot(index)
            else:
                self._frames[index] = slot  # now the most recently used
            slot.used = True
        if ahead:
            self._read_ahead(index)
        if owner:
            return self._fill(slot, index)
        slot.ready.wait()
        if slot.error is not None:
            raise slot.error
        return slot.data

    def _load_frame(self, index: int) -> bytes:
        fe = self.manifest.frames[index]
        return self._read_indexed_frame(f"frame {index}", fe.offset, FRAME_DATA, index, fe.stored, fe.raw,
                                        fe.codec)

    def _read_indexed_frame(self, what: str, offset: int, ftype: int, seq: int, stored: int, raw: int,
                            codec: int) -> bytes:
        """The content of the frame an index entry points at (a data frame, a
        page), checked against the entry and its checksums (SPEC.md 10.2, 10.4)."""
        fd = self.fh.fileno()
        try:
            head = unpack_frame_header(_pread(fd, FRAME.size, offset), offset)
        except FormatError as exc:
            raise type(exc)(f"{what}: {exc}") from exc
        if head[:5] != (ftype, codec, seq, stored, raw):
            raise CorruptError(f"{what} at offset {offset} does not match the index")
        payload = _pread(fd, stored, offset + FRAME.size)
        with self._lock:
            self.bytes_read += FRAME.size + len(payload)
        if len(payload) != stored:
            raise TruncatedError(f"truncated .bkp file: {what} is incomplete")
        if xxh3(payload) != head[5]:
            raise ChecksumError(f"{what} at offset {offset} is damaged (checksum mismatch)")
        return self._decode(payload, codec, raw, what, ftype=ftype, seq=seq)

    def done_with(self, index: int) -> None:
        """A blob stream has read what it needs of frame ``index``."""
        with self._lock:
            if self._wanted[index] > 0:
                self._wanted[index] -= 1

    def open_blob(self, blob: Blob) -> BinaryIO:
        return _BlobFile(_BlobStream(self, blob), buffer_size=1 << 20)  # type: ignore[return-value]

    def frame_of(self, stream_offset: int) -> int:
        return bisect.bisect_right(self._starts, stream_offset) - 1

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.shutdown(wait=True, cancel_futures=True)
            self._ahead = None
            for index, slot in list(self._frames.items()):
                if not slot.ready.is_set():  # its task was cancelled
                    self._abandon(slot, index)
        self.fh.close()
        self._frames.clear()


def open_named(path: str | os.PathLike[str], passphrase: str | None = None) -> BkpReader:
    """A reader whose opening errors name the file (a set has several; a
    message on its own should say which file it is about)."""
    try:
        return BkpReader(path, passphrase=passphrase)
    except (FormatError, WrongPassphraseError) as exc:
        name = Path(path).name
        if name in str(exc):
            raise
        raise type(exc)(f"{name}: {exc}") from exc


def _pread(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset``, fewer only at the end of the file. One
    pread(2) returns at most 2 GiB - 4 KiB on Linux, and a frame may be
    larger (SPEC 5.5: the frame size is the writer's choice)."""
    if n <= 1 << 30:
        return os.pread(fd, n, offset)
    buf = bytearray(n)  # n is bounded by the file size (checked on opening)
    view, got = memoryview(buf), 0
    while got < n:
        k = os.preadv(fd, [view[got:got + (1 << 30)]], offset + got)
        if k == 0:
            break
        got += k
    view.release()
    del buf[got:]
    return buf  # type: ignore[return-value]


def decompress(payload: bytes, codec: int, raw: int, what: str) -> bytes:
    """A frame's content from its (decrypted) payload, size-checked; raises the
    format's errors. Used by the reader, ``bkp validate`` and ``bkp salvage``."""
    if codec != CODEC_ZSTD:
        data = payload
    else:
        # Check the size the zstd frame announces before it allocates anything:
        # a damaged or crafted length must give an error, not a MemoryError.
        try:
            announced = zstandard.frame_content_size(payload)
        except zstandard.ZstdError as exc:
            raise ChecksumError(f"{what} cannot be decompressed: {exc}") from exc
        if announced != raw:
            raise CorruptError(f"{what}: its zstd frame announces {announced} bytes, its header {raw}")
        try:
            # a decompressor per call: they are not thread-safe, and cheap to make
            if not raw:
                data = b""
            elif raw <= ONE_SHOT:
                data = zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw)
            else:
                data = _inflate(payload, raw)
        except zstandard.ZstdError as exc:
            raise ChecksumError(f"{what} cannot be decompressed: {exc}") from exc
    if len(data) != raw:
        raise CorruptError(f"{what} has {len(data)} bytes, {raw} announced")
    return data


def _inflate(payload: bytes, raw: int) -> bytes:
    """Decompress piece by piece: memory grows with what the zstd frame really
    holds, never with the size it announces (a crafted header can announce
    any size up to 2**64 in a few bytes). Stops one byte past ``raw``."""
    out = bytearray()
    with zstandard.ZstdDecompressor().stream_reader(payload) as stream:
        while len(out) <= raw and (chunk := stream.read(min(16 << 20, raw + 1 - len(out)))):
            out += chunk
    return out  # type: ignore[return-value]  # a bytearray: no copy of a large frame


class _Slot:
    """A cached frame, possibly still being decoded by another thread."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.data = b""
        self.error: BaseException | None = None
        self.used = False  # asked for by a reader (not only decoded ahead)


class _BlobFile(io.BufferedReader):
    """A blob, buffered for small reads (parsers), and offering its bytes
    without copies to whoever takes them whole (``views``, see
    :func:`dicomvault.engine.stream_views`)."""

    def views(self) -> Iterator[memoryview]:
        return self.raw.views()  # type: ignore[attr-defined,no-any-return]


class _BlobStream(io.RawIOBase):
    """A blob as a readable stream, decompressing frame by frame."""

    def __init__(self, reader: BkpReader, blob: Blob) -> None:
        self.reader, self.pos, self.end = reader, blob.offset, blob.offset + blob.length
        # frames of the blob not yet done with (the reader keeps planned frames until then)
        self._next = reader.frame_of(blob.offset)
        self._last = reader.frame_of(self.end - 1) if blob.length else self._next - 1
        self._held: tuple[int, bytes] | None = None  # the frame being read: kept, not asked for again
        self._touched = False  # read from: views() would miss what the buffer above holds

    def readable(self) -> bool:
        return True

    def _done_until(self, index: int) -> None:
        while self._next <= min(index, self._last):
            self.reader.done_with(self._next)
            self._next += 1

    def _frame(self) -> tuple[int, bytes, int, int]:
        """The frame holding ``pos``: its number, its content, where ``pos`` is
        in it, how much of the blob it still holds."""
        index = self.reader.frame_of(self.pos)
        fe = self.reader.manifest.frames[index]
        if self._held is not None and self._held[0] == index:
            data = self._held[1]
        else:
            # Held while this stream reads it: the cache may drop it meanwhile (other workers,
            # read-ahead) without this stream having it decoded again for its next read.
            data = self.reader.read_frame(index)
            self._held = (index, data)
        start = self.pos - fe.stream_offset
        return index, data, start, min(self.end - self.pos, fe.raw - start)

    def _advance(self, index: int, n: int) -> None:
        fe = self.reader.manifest.frames[index]
        self.pos += n
        if self.pos == fe.stream_offset + fe.raw or self.pos == self.end:
            self._done_until(index)
            self._held = None

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.pos >= self.end:
            return 0
        self._touched = True
        index, data, start, left = self._frame()
        n = min(len(buffer), left)
        with memoryview(data) as view:  # a slice of a memoryview: no copy of the frame's bytes
            buffer[:n] = view[start:start + n]
        self._advance(index, n)
        return n

    def views(self) -> Iterator[memoryview]:
        """The blob as read-only slices of its decoded frames: no copy at all."""
        if self._touched:
            raise ValueError("views() of a blob stream that was read from")
        while self.pos < self.end:
            index, data, start, n = self._frame()
            view = memoryview(data)[start:start + n].toreadonly()
            try:
                yield view
            finally:
                view.release()
            self._advance(index, n)
