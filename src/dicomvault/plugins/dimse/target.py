"""A DICOM server as a target (``cstore`` and ``dicom://``).

Outcomes: status 0x0000 is ``stored``; a warning status (0xB000, 0xB006,
0xB007, 0x0111, 0x0001, other 0xBxxx) is ``stored-with-warning`` with the
status and its meaning as the reason (not a problem, but never counted as
verified by ``move``, which deletes only what the server acknowledged
cleanly); any other status, a timeout, an abort or a refused association is
``failed`` for the instances it touched, and the run goes on.
"""
from __future__ import annotations

import hashlib
import io
import logging
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from dicomvault.engine import AttachmentRecord, Attributes, ConflictPolicy, Item, Opener, Outcome

from . import status
from .association import Association, AssociationError, ChecksumMismatch, LinkError, Peer, Timeouts
from .contexts import ContextPlan
from .dataset import NATIVE, UNCOMPRESSED, NotSendable, Rest, converted, read_head

log = logging.getLogger("dicomvault.cstore")


@dataclass(frozen=True)
class SendOptions:
    transcode: bool = True  # convert losslessly to an uncompressed syntax when the server needs it
    associations: int = 1
    retries: int = 3  # further attempts when an association cannot be made (not after a permanent refusal)
    retry_wait: float = 1.0  # first wait; doubled after each attempt, at most 30 s


class _Busy(Exception):
    """An extra parallel association was not answered while another one is
    open: the server takes fewer associations at a time (DCMTK storescp
    without --fork takes one). The slot is given up, the item goes on another."""


EXTRA_ACSE_TIMEOUT = 5.0


class _Slot:
    """One association of the pool, with the context group it was opened for."""

    def __init__(self) -> None:
        self.assoc: Association | None = None
        self.group = -1
        self.version = -1


class DicomTarget:
    """Sends instances to one server over up to ``options.associations``
    associations. Attributes and attachments have no place on a DICOM server:
    they are reported as ignored."""

    def __init__(self, peer: Peer, options: SendOptions, plan: ContextPlan | None = None) -> None:
        self.peer = peer
        self.options = options
        self.plan = plan or ContextPlan()
        self.description = f"DICOM server {peer}" + (" (TLS)" if peer.tls else "")
        self._slots: queue.Queue[_Slot] = queue.Queue()
        self._all = [_Slot() for _ in range(max(1, options.associations))]
        for slot in self._all:
            self._slots.put(slot)
        self._lock = threading.Lock()
        # Associations are opened one at a time: a slot deciding whether it is an *extra*
        # association must see the ones being opened, not only those already open.
        self._opening = threading.Lock()
        self._broken: dict[tuple[int, int], str] = {}  # (group, version) -> why no association
        self.stats = {"associations": 0, "converted": 0, "given up": 0}

    # ------------------------------------------------------------------ Target
    def lookup(self, sop_uid: str) -> str | None:
        return None  # a C-STORE SCP cannot be asked; the server itself decides about duplicates

    def put_instance(self, item: Item, policy: ConflictPolicy) -> tuple[Outcome, str]:
        while True:
            slot = self._slots.get()
            try:
                result = self._send(slot, item)
            except _Busy:
                with self._lock:
                    self.stats["given up"] += 1
                log.info("%s did not take one more association; going on with fewer", self.peer)
                continue  # this slot is not given back: one parallel association fewer
            self._slots.put(slot)
            return result

    def put_attributes(self, attrs: Attributes, policy: ConflictPolicy) -> tuple[Outcome, str]:
        return Outcome.IGNORED, "a DICOM server keeps no database attributes"

    def put_attachment(self, record: AttachmentRecord, open_: Opener,
                       policy: ConflictPolicy) -> tuple[Outcome, str]:
        return Outcome.IGNORED, "a DICOM server keeps no attachments"

    def finish(self, ok: bool) -> None:
        """Release every association (abort them when the run did not end well)."""
        slots = []
        while True:
            try:
                slots.append(self._slots.get_nowait())
            except queue.Empty:
                break
        for slot in slots:
            if slot.assoc is not None:
                slot.assoc.release() if ok else slot.assoc.abort()
                slot.assoc = None
            self._slots.put(slot)

    # ------------------------------------------------------------------ sending
    def _associate(self, slot: _Slot, group: int, version: int) -> Association | str:
        """The slot's association for the group, opened (with retries) when
        needed; or why none could be made."""
        if slot.assoc is not None and slot.assoc.alive and (slot.group, slot.version) == (group, version):
            return slot.assoc
        if slot.assoc is not None:
            slot.assoc.release()
            slot.assoc = None
        with self._opening:
            return self._open(slot, group, version)

    def _open(self, slot: _Slot, group: int, version: int) -> Association | str:
        with self._lock:
            if (group, version) in self._broken:
                return self._broken[(group, version)]
            others = any(s is not slot and s.assoc is not None and s.assoc.alive for s in self._all)
        if others:
            # One more parallel association: asked once, with a short ACSE timeout; a server
            # that takes fewer associations does not fail the instance.
            t = self.peer.timeouts
            quick = replace(self.peer, timeouts=Timeouts(t.network, min(t.acse, EXTRA_ACSE_TIMEOUT), t.dimse))
            try:
                slot.assoc = Association.open(quick, self.plan.contexts(group))
            except AssociationError as exc:
                if not exc.permanent:
                    raise _Busy() from exc
            else:
                slot.group, slot.version = group, version
                with self._lock:
                    self.stats["associations"] += 1
                return slot.assoc
        wait = self.options.retry_wait
        for attempt in range(self.options.retries + 1):
            try:
                slot.assoc = Association.open(self.peer, self.plan.contexts(group))
                slot.group, slot.version = group, version
                with self._lock:
                    self.stats["associations"] += 1
                return slot.assoc
            except AssociationError as exc:
                reason = str(exc)
                if exc.permanent or attempt == self.options.retries:
                    break
                log.info("association with %s failed (%s); retrying in %.1f s", self.peer, reason, wait)
                time.sleep(wait)
                wait = min(wait * 2, 30.0)
        tries = f" (after {attempt + 1} attempts)" if attempt else ""
        reason = f"{reason}{tries}"
        with self._lock:
            self._broken[(group, version)] = reason
        return reason

    def _send(self, slot: _Slot, item: Item) -> tuple[Outcome, str]:
        rec = item.instance
        try:
            with item.open() as fh:
                head, offset, meta = read_head(fh)
                sop_class = rec.sop_class_uid or meta.get(0x0002, "")
                ts = meta.get(0x0010) or rec.transfer_syntax or UNCOMPRESSED[1]
                if not sop_class:
                    return Outcome.FAILED, "no SOP Class UID known for this instance; not sent"
                group, version = self.plan.group_for(sop_class, ts)
                assoc = self._associate(slot, group, version)
                if isinstance(assoc, str):
                    return Outcome.FAILED, assoc
                cid = assoc.context_for(sop_class, ts)
                if cid is not None:
                    code, comment = assoc.store(cid, sop_class, rec.sop_uid, Rest(head, offset, fh),  # type: ignore[arg-type]
                                                head[:offset], rec.sha256)
                    note = ""
            if cid is None:
                plain = [t for t in UNCOMPRESSED if assoc.context_for(sop_class, t) is not None]
                if not plain:
                    why = assoc.refused.get(sop_class, "not accepted")
                    return Outcome.FAILED, (f"the server accepted no presentation context for SOP class "
                                            f"{sop_class} ({why})")
                if not self.options.transcode:
                    return Outcome.FAILED, (f"the server does not accept transfer syntax {ts} for SOP "
                                            f"class {sop_class} and --transcode is never; not sent")
                with item.open() as fh:
                    whole = fh.read()
                if rec.sha256 and hashlib.sha256(whole).hexdigest() != rec.sha256:
                    return Outcome.FAILED, ("the bytes read do not match their SHA-256 (stored copy "
                                            "damaged?); not sent")
                data = converted(io.BytesIO(whole), plain[0])
                del whole
                code, comment = assoc.store(assoc.context_for(sop_class, plain[0]) or 0, sop_class,
                                            rec.sop_uid, data)
                with self._lock:
                    self.stats["converted"] += 1
                kind = "decompressed" if ts not in NATIVE else "converted"
                note = f"{kind} from {ts} to {plain[0]} (the server does not take {ts})"
        except (LinkError, ChecksumMismatch, NotSendable) as exc:
            return Outcome.FAILED, str(exc)
        verdict = status.verdict(code)
        if verdict == "success":
            if note:  # the server holds other bytes than ours: never counted as a verified copy
                return Outcome.CONVERTED, note
            return Outcome.STORED, ""
        text = status.describe(code, comment)
        if note:
            text = f"{text}; {note}"
        if verdict == "warning":
            return Outcome.STORED_WITH_WARNING, text
        return Outcome.FAILED, text


class ParallelDicomTarget(DicomTarget):
    """With several associations: the run loop's worker threads send (in
    ``prepare``) and the outcomes are reported in order (``put_prepared``).
    Nothing can be taken back from a server, so ``discard`` has nothing to do."""

    @property
    def prepare_threads(self) -> int:
        return len(self._all)  # one sending thread per association

    @property
    def prepare_window(self) -> int:
        return 4 * len(self._all)  # sent ahead of the report: kept short

    def prepare(self, item: Item, policy: ConflictPolicy) -> Any:
        return self.put_instance(item, policy)

    def put_prepared(self, item: Item, token: Any, policy: ConflictPolicy) -> tuple[Outcome, str]:
        return token  # type: ignore[no-any-return]

    def discard(self, token: Any) -> None:
        pass
