"""The run loop's hand-over to targets that prepare items in worker threads:
outcomes come back in the source's order, items of one batch (``Item.batch``)
are prepared by one worker in order, a failing item fails alone, and what
was prepared but never handed over is discarded."""
from __future__ import annotations

import io
import threading
import time

from dicomvault.engine import Item, Outcome, Rejected
from dicomvault.engine.errors import DicomvaultError
from dicomvault.engine.run import _hand_over
from dicomvault.engine.types import (
    ConflictPolicy,
    InstanceRecord,
    PatientRecord,
    SeriesRecord,
    StudyRecord,
)

PATIENT = PatientRecord(key="p")
STUDY = StudyRecord(study_uid="1.2", patient_key="p")
SERIES = SeriesRecord(series_uid="1.2.3", study_uid="1.2")


def item(n: int, batch: object = None) -> Item:
    rec = InstanceRecord(sop_uid=f"1.2.3.{n}", series_uid="1.2.3")
    return Item(rec, SERIES, STUDY, PATIENT, lambda: io.BytesIO(b""), batch=batch)


class PreparingTarget:
    """Records which thread prepared what, in which order; fails the items it is told to."""

    description = "test target"

    def __init__(self, fail: set[str] = frozenset(), slow: float = 0.0) -> None:  # type: ignore[assignment]
        self.fail, self.slow = fail, slow
        self.lock = threading.Lock()
        self.prepared: list[tuple[str, int]] = []  # (sop_uid, thread id) in call order
        self.tokens: set[str] = set()  # prepared, not yet put or discarded
        self.put: list[str] = []
        self.discarded: list[str] = []

    def prepare(self, it: Item, policy: ConflictPolicy) -> str:
        time.sleep(self.slow)
        uid = it.instance.sop_uid
        with self.lock:
            self.prepared.append((uid, threading.get_ident()))
        if uid in self.fail:
            raise DicomvaultError(f"instance {uid}: cannot read")
        with self.lock:
            self.tokens.add(uid)
        return uid

    def put_prepared(self, it: Item, token: str, policy: ConflictPolicy) -> tuple[Outcome, str]:
        assert token == it.instance.sop_uid
        with self.lock:
            self.tokens.remove(token)
        self.put.append(token)
        return Outcome.STORED, ""

    def discard(self, token: str) -> None:
        with self.lock:
            self.tokens.remove(token)
        self.discarded.append(token)


def test_outcomes_in_order_and_one_worker_per_batch() -> None:
    batches = ["a"] * 5 + ["b"] * 3 + [None, None] + ["c"] * 4 + ["a"] * 2  # "a" again: a new batch
    items: list[Item | Rejected] = [item(n, key) for n, key in enumerate(batches)]
    items.insert(8, Rejected("file x", "not DICOM"))  # between two batches
    target = PreparingTarget(fail={"1.2.3.2"}, slow=0.002)

    got = list(_hand_over(items, target, ConflictPolicy.SKIP, False))  # type: ignore[arg-type]

    assert [g[0] for g in got] == items  # the source's order, the rejected file in its place
    outcomes = {g[0].instance.sop_uid: (g[1], g[2]) for g in got if isinstance(g[0], Item)}
    assert outcomes.pop("1.2.3.2") == (Outcome.FAILED, "instance 1.2.3.2: cannot read")
    assert set(outcomes.values()) == {(Outcome.STORED, "")}
    assert got[8][1] is None
    threads = dict(target.prepared)
    order = [uid for uid, _t in target.prepared]
    for run in (range(0, 5), range(5, 8), range(10, 14), range(14, 16)):
        uids = [f"1.2.3.{n}" for n in run]
        assert len({threads[u] for u in uids}) == 1, f"batch {list(run)} was split over workers"
        assert [u for u in order if u in uids] == uids, f"batch {list(run)} was not prepared in order"
    assert not target.tokens and not target.discarded


def test_stopping_early_discards_what_was_prepared() -> None:
    items = [item(n, n // 7) for n in range(200)]
    target = PreparingTarget()
    handed = _hand_over(items, target, ConflictPolicy.SKIP, False)  # type: ignore[arg-type]
    first = [next(handed) for _ in range(10)]
    handed.close()  # what a conflict under "fail" or Ctrl-C does

    assert [g[0] for g in first] == items[:10]
    assert target.put == [f"1.2.3.{n}" for n in range(10)]
    assert not target.tokens  # everything prepared was either put or discarded
    assert len(target.put) + len(target.discarded) == len(target.prepared)


def test_read_ahead_touches_only_local_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Targets hint the kernel about the next items' files; an opener that is
    not a local file (a download from a server) must never be called for it."""
    from dicomvault.engine import FileOpener, read_ahead

    calls: list[str] = []

    def remote() -> io.BytesIO:
        calls.append("opened")
        return io.BytesIO(b"x")

    read_ahead(remote)
    assert calls == []

    path = tmp_path / "one.dcm"
    path.write_bytes(b"DICM" * 1000)
    opener = FileOpener(path)
    read_ahead(opener)  # a hint: nothing to see but that it does not fail
    read_ahead(FileOpener(tmp_path / "missing.dcm"))  # the real read reports it, not the hint
    with opener() as fh:
        assert fh.read() == b"DICM" * 1000
