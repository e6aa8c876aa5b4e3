"""The contracts a plugin implements: sources, targets, databases, operations.

A *source* offers instances, attributes and attachments; a *target* accepts
them. Any source works with any target: the run loop in
:mod:`dicomvault.engine.run` moves items between them and reports outcomes.
A *database* is a place that is both, plus browsing and bookkeeping.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import msgspec

from .types import (
    AttachmentRecord,
    Attributes,
    ConflictPolicy,
    InstanceRecord,
    Item,
    Level,
    Opener,
    Outcome,
    PatientRecord,
    Rejected,
    Report,
    Selection,
    SeriesRecord,
    StudyRecord,
    read_ahead,
)

if TYPE_CHECKING:
    from .context import Context


@runtime_checkable
class Source(Protocol):
    """Where items come from.

    ``instances`` yields :class:`Item` objects (or :class:`Rejected` for input
    the source cannot offer) for the selection, in an order that reads
    efficiently. Opening an item's bytes must stream: never read a whole file
    into memory, and openers may be called from several threads at once (the
    run loop copies items in parallel), so they must be thread-safe.
    ``attributes`` and ``attachments`` yield what belongs to the selected
    series and to the studies and patients that contain them.

    Optional, for speed: items handed out one after another with the same
    ``Item.batch`` key (any hashable value; None, the default, means none)
    share something costly to make in the source, such as one decompressed
    frame of a .bkp. The run loop then has a single worker prepare them, in
    order, while other workers take other batches.

    Optional, for ``move``: ``delete(sop_uid, sha256) -> bool`` deletes one
    instance only if the bytes stored under that UID still have that
    SHA-256 (content that changed since it was copied is kept), and returns
    whether it did. It must be durable when it returns, and must never
    remove bytes that another instance or attachment still refers to.
    ``move`` calls it only for instances the target has confirmed, after
    the target's ``finish(True)``.
    """

    description: str

    def instances(self, selection: Selection) -> Iterator[Item | Rejected]: ...

    def attributes(self, selection: Selection) -> Iterator[Attributes]: ...

    def attachments(self, selection: Selection) -> Iterator[tuple[AttachmentRecord, Opener]]: ...

    def close(self) -> None: ...


@runtime_checkable
class Target(Protocol):
    """Where items go.

    ``lookup`` returns the SHA-256 stored under a SOP Instance UID, or None.
    ``put_instance`` stores one instance under the conflict policy and returns
    its outcome plus a reason for problems; it must verify the bytes against
    ``item.instance.sha256`` when that is set and never damage what it already
    holds when something fails. ``finish(ok=True)`` makes everything durable
    (for a file target: fsync and rename); ``finish(ok=False)`` discards what
    is not committed yet.

    The outcomes ``stored``, ``unchanged`` and ``overwritten`` are promises:
    a target returns them only when it has verified that it holds exactly
    the item's bytes (SHA-256, or the peer's own confirmation of a complete
    transfer), so that once ``finish(True)`` has returned the copy is
    durable. ``move`` deletes from the source on the strength of them;
    anything the target cannot confirm must be ``failed`` (or
    ``conflict``/``rejected``), never one of those three.

    Optional, for speed: a target may also define ``prepare(item, policy)``
    (thread-safe: copy and hash the bytes somewhere private, verify them,
    return a token or None), ``put_prepared(item, token, policy)`` (called
    in order, in the run loop's thread: decide and commit, same result as
    ``put_instance``) and ``discard(token)``. The run loop then prepares a
    bounded window of items ahead in worker threads (a source's batches,
    see ``Source``, each in one worker); ``prepare_threads`` and
    ``prepare_window`` attributes, when set, say how many workers and how
    many items ahead (a sender with N connections wants N workers, and a
    short window: what it prepared is already sent, and an interrupted run
    reports only what was handed over).

    Optional, for honest dry runs: ``plan_attributes(attrs, policy)`` and
    ``plan_attachment(record, policy)`` return what the matching ``put_*``
    would do (``would-store``, ``would-overwrite``, ``unchanged``,
    ``conflict``) without changing anything. Without them a dry run reports
    "would-store". A dry run only ever calls ``lookup`` and ``plan_*``, then
    ``finish(False)``.
    """

    description: str

    def lookup(self, sop_uid: str) -> str | None: ...

    def put_instance(self, item: Item, policy: ConflictPolicy) -> tuple[Outcome, str]: ...

    def put_attributes(self, attrs: Attributes, policy: ConflictPolicy) -> tuple[Outcome, str]: ...

    def put_attachment(self, record: AttachmentRecord, open_: Opener,
                       policy: ConflictPolicy) -> tuple[Outcome, str]: ...

    def finish(self, ok: bool) -> None: ...


class ReadAheadTarget:
    """A mixin for targets that write items one after another (a .bkp, a zip):
    the run loop's workers only ask the kernel to read the next items' files
    (:func:`~dicomvault.engine.read_ahead`), a window ahead, so that the
    in-order ``put_instance`` rarely waits for the disk."""

    def prepare(self, item: Item, policy: ConflictPolicy) -> None:
        read_ahead(item.open)

    def put_prepared(self, item: Item, token: None, policy: ConflictPolicy) -> tuple[Outcome, str]:
        return self.put_instance(item, policy)  # type: ignore[attr-defined,no-any-return]

    def discard(self, token: None) -> None:
        pass


class TreeNode(msgspec.Struct, kw_only=True):
    """One line of ``ls``: an entity with counts and sizes of what it holds."""

    level: Level
    uid: str
    label: dict[str, object]
    studies: int = 0
    series: int = 0
    instances: int = 0
    size: int = 0
    children: list[TreeNode] = msgspec.field(default_factory=list)


@runtime_checkable
class Database(Protocol):
    """An online image database: a source, a target, and bookkeeping.

    Optional: ``collect_garbage(dry_run=False)`` removes what interrupted
    writers left behind (never anything the database names) and returns
    what it removed, as a msgspec Struct (``dicomvault gc``)."""

    url: str

    def source(self) -> Source: ...

    def target(self) -> Target: ...

    def hierarchy(self) -> Iterator[tuple[PatientRecord, StudyRecord, SeriesRecord]]: ...

    def instances(self, selection: Selection) -> Iterator[InstanceRecord]: ...

    def tree(self, selection: Selection, depth: Level) -> list[TreeNode]: ...

    def get_selected(self) -> list[Selection]: ...

    def set_selected(self, selections: list[Selection]) -> None: ...

    def add_attachment(self, level: Level, uid: str, path: str, name: str,
                       media_type: str) -> AttachmentRecord: ...

    def update_attributes(self, level: Level, uid: str, *, comment: str | None = None,
                          add_tags: tuple[str, ...] = (), fields: dict[str, str] | None = None,
                          ) -> Attributes: ...

    def close(self) -> None: ...


class Kind(msgspec.Struct, frozen=True, kw_only=True):
    """A kind of source, target or database, contributed by a plugin.

    ``matches(url)`` says whether this kind handles an address (a URL scheme,
    a file suffix...); ``open(url, context)`` opens it. For a target,
    ``open`` must not change anything until items arrive.
    """

    name: str
    description: str
    matches: Callable[[str], bool]
    open: Callable[[str, Context], object]


class Operation(msgspec.Struct, frozen=True, kw_only=True):
    """A command of the ``dicomvault`` CLI, contributed by a plugin.

    ``configure(parser)`` adds arguments; ``run(context, args)`` does the
    work and returns a :class:`Report` (its exit code is the command's) or an
    int exit code for commands that only print.
    """

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[Context, argparse.Namespace], Report | int]
