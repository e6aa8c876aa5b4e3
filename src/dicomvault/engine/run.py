"""The run loop: move a selection from any source to any target.

One pass, streaming: items are handed over one at a time, each gets an
outcome, and the batch goes on after a per-item failure. Only a conflict
under policy ``fail`` stops the run, and that is checked before anything is
written; and a ``TargetError`` (the target can take nothing more: disk
full) stops it at once.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from .context import Context
from .errors import ConflictError, DicomvaultError, TargetError, UsageError
from .interfaces import Source, Target
from .types import ConflictPolicy, Event, Item, Outcome, Rejected, Report, Selection

log = logging.getLogger(__name__)
CHUNK = 1 << 20
PREPARE_THREADS = 4
# Items prepared ahead of the in-order commits. Wide, so that the workers go on while the commit
# thread waits for the disk (a batch's durability); a prepared item is a staged file on disk plus
# a small object, so memory does not grow with it.
PREPARE_WINDOW = 256
PREPARE_BATCH = 32  # at most this many items of one batch in one task


def sha256_of(item: Item) -> str:
    """The item's SHA-256: from its record, or by streaming its bytes."""
    if item.instance.sha256:
        return item.instance.sha256
    digest = hashlib.sha256()
    with item.open() as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def planned_outcome(target: Target, item: Item, policy: ConflictPolicy) -> Outcome:
    """What ``put_instance`` would do, without doing it."""
    stored = target.lookup(item.instance.sop_uid)
    if stored is None:
        return Outcome.WOULD_STORE
    if stored == sha256_of(item):
        return Outcome.UNCHANGED
    return Outcome.WOULD_OVERWRITE if policy is ConflictPolicy.OVERWRITE else Outcome.CONFLICT


def _preflight(source: Source, target: Target, selection: Selection) -> None:
    conflicts = []
    for it in source.instances(selection):
        if isinstance(it, Item) and planned_outcome(target, it, ConflictPolicy.FAIL) is Outcome.CONFLICT:
            conflicts.append(it.instance.sop_uid)
    if conflicts:
        shown = ", ".join(conflicts[:5]) + (f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
        raise ConflictError(f"{len(conflicts)} instance(s) differ from what the target holds under the "
                            f"same SOP Instance UID ({shown}); nothing was changed (policy: fail)")


def _plan(target: Target, method: str, record: object, policy: ConflictPolicy) -> tuple[Outcome, str]:
    """A dry run's prediction for attributes or an attachment: the target's
    own ``plan_*`` when it has one, else "would store"."""
    plan = getattr(target, method, None)
    return plan(record, policy) if plan is not None else (Outcome.WOULD_STORE, "")  # type: ignore[no-any-return]


def _put(target: Target, item: Item, policy: ConflictPolicy, dry_run: bool) -> tuple[Outcome, str]:
    try:
        if dry_run:
            return planned_outcome(target, item, policy), ""
        return target.put_instance(item, policy)
    except TargetError:
        raise
    except (DicomvaultError, OSError) as exc:
        return Outcome.FAILED, str(exc)


def _hand_over(items: Iterable[Item | Rejected], target: Target, policy: ConflictPolicy,
               dry_run: bool) -> Iterator[tuple[Item | Rejected, Outcome | None, str]]:
    """Give each item to the target; yields (item, outcome, reason) in order.

    A target with ``prepare``/``put_prepared`` (see the Target contract) gets
    the heavy part done in worker threads, a bounded window ahead of the
    in-order commits: copying and hashing release the GIL, so this uses
    every core while memory stays flat. Consecutive items with the same
    batch key (see the Source contract) are one task for one worker: they
    share a decoded frame, so no two workers wait for the same frame while
    different frames decode in parallel.
    """
    prepare = getattr(target, "prepare", None)
    if prepare is None or dry_run:
        for it in items:
            yield (it, None, "") if isinstance(it, Rejected) else (it, *_put(target, it, policy, dry_run))
        return
    # (item, its task, its place in the task's results); a task prepares one batch of items
    window: collections.deque[tuple[Item | Rejected, Future[list[object]] | None, int]] = collections.deque()
    threads = getattr(target, "prepare_threads", None) or PREPARE_THREADS
    width = getattr(target, "prepare_window", None) or PREPARE_WINDOW
    pool = ThreadPoolExecutor(threads, thread_name_prefix="prepare")
    group: list[Item] = []  # the batch being gathered, not submitted yet

    def prepare_all(batch: list[Item]) -> list[object]:
        """Tokens, or the per-item error, in order."""
        out: list[object] = []
        try:
            for it in batch:
                try:
                    out.append(prepare(it, policy))
                except (DicomvaultError, OSError) as exc:
                    out.append(exc)
        except BaseException:
            for token in out:  # not handed to anyone: drop it before the error goes up
                if not isinstance(token, BaseException):
                    target.discard(token)  # type: ignore[attr-defined]
            raise
        return out

    def submit() -> None:
        if group:
            future = pool.submit(prepare_all, list(group))
            window.extend((it, future, i) for i, it in enumerate(group))
            group.clear()

    def settle() -> tuple[Item | Rejected, Outcome | None, str]:
        it, future, i = window[0]
        if future is None or isinstance(it, Rejected):
            window.popleft()
            return it, None, ""
        # Waited for while still in the window: an interrupt here leaves it to the clean-up below.
        prepared = future.result()[i]
        window.popleft()
        if isinstance(prepared, TargetError):
            raise prepared
        if isinstance(prepared, (DicomvaultError, OSError)):
            return it, Outcome.FAILED, str(prepared)
        try:
            return (it, *target.put_prepared(it, prepared, policy))  # type: ignore[attr-defined]
        except TargetError:
            raise
        except (DicomvaultError, OSError) as exc:
            return it, Outcome.FAILED, str(exc)

    try:
        for it in items:
            if isinstance(it, Rejected):
                submit()
                window.append((it, None, 0))
            else:
                if group and (it.batch is None or it.batch != group[-1].batch or len(group) >= PREPARE_BATCH):
                    submit()
                group.append(it)
                if it.batch is None:
                    submit()
            while len(window) > width:
                yield settle()
        submit()
        while window:
            yield settle()
    finally:
        # Stopped early (conflict under "fail", Ctrl-C): drop what was prepared and not handed
        # over (a task's first items may have been handed over already).
        for _it, future, i in window:
            if future is None or future.cancel():
                continue
            try:
                prepared = future.result()[i]
                if not isinstance(prepared, BaseException):
                    target.discard(prepared)  # type: ignore[attr-defined]
            except Exception:
                pass
        pool.shutdown(wait=True)


def transfer(ctx: Context, source: Source, target: Target, selection: Selection, *,
             policy: ConflictPolicy = ConflictPolicy.SKIP, dry_run: bool = False,
             operation: str = "transfer", total: int | None = None,
             on_instance: Callable[[Item, Outcome], None] | None = None) -> Report:
    """Move what ``selection`` picks from ``source`` to ``target``.

    ``on_instance(item, outcome)``, when given, is told each instance's
    outcome in order (``move`` uses it to learn what the target confirmed).

    Returns the report; raises only for errors that stop the whole run (the
    target is then rolled back to its last durable state).
    """
    report = Report(operation=operation)
    started = time.monotonic()
    ctx.emit(Event(kind="start", operation=operation, total=total))
    ok = False

    def record(what: str, outcome: Outcome, item: str, reason: str = "", size: int = 0) -> None:
        report.add(what, outcome, item, reason, size)
        if outcome.is_problem:
            log.debug("%s %s: %s%s", what, item, outcome.value, f" ({reason})" if reason else "")
        ctx.emit(Event(kind="item", operation=operation, item=item, what=what,  # type: ignore[arg-type]
                       outcome=outcome.value, reason=reason, size=size))

    try:
        if policy is ConflictPolicy.FAIL:
            _preflight(source, target, selection)
        handed = _hand_over(source.instances(selection), target, policy, dry_run)
        with contextlib.closing(handed):  # type: ignore[type-var]
            for it, outcome, reason in handed:
                if isinstance(it, Rejected):
                    record("file", Outcome.IGNORED if it.ignored else Outcome.REJECTED, it.item, it.reason)
                    continue
                uid = it.instance.sop_uid
                assert outcome is not None
                if outcome is Outcome.CONFLICT and not reason:
                    reason = "other content is stored under this SOP Instance UID; left untouched"
                if outcome.is_problem and it.where:
                    reason = f"{it.where}: {reason}" if reason else it.where
                record("instance", outcome, uid, reason, it.instance.size)
                if on_instance is not None:
                    on_instance(it, outcome)
                if outcome is Outcome.CONFLICT and policy is ConflictPolicy.FAIL:
                    raise ConflictError(f"instance {uid} conflicts with the target (policy: fail)")
        for attrs in source.attributes(selection):
            name = f"{attrs.level} {attrs.uid if attrs.level != 'patient' else '(patient)'}"
            try:
                if dry_run:
                    outcome, reason = _plan(target, "plan_attributes", attrs, policy)
                else:
                    outcome, reason = target.put_attributes(attrs, policy)
            except TargetError:
                raise
            except (DicomvaultError, OSError) as exc:
                outcome, reason = Outcome.FAILED, str(exc)
            record("attributes", outcome, name, reason)
        for rec, opener in source.attachments(selection):
            name = rec.attachment_id
            try:
                if dry_run:
                    outcome, reason = _plan(target, "plan_attachment", rec, policy)
                else:
                    outcome, reason = target.put_attachment(rec, opener, policy)
            except TargetError:
                raise
            except (DicomvaultError, OSError) as exc:
                outcome, reason = Outcome.FAILED, str(exc)
            record("attachment", outcome, name, reason, rec.size)
        if not report.counts and not selection.whole:
            # A mistyped UID must not look like a successful (empty) backup or export.
            raise UsageError(f"the selection matches nothing in {source.description}; nothing was done")
        ok = True
    finally:
        target.finish(ok and not dry_run)
        report.seconds = round(time.monotonic() - started, 3)
        if not ok:
            report.aborted = report.aborted or "stopped before the end"
        ctx.emit(Event(kind="finish", operation=operation))
    ctx.hooks.on_report(report)
    return report
