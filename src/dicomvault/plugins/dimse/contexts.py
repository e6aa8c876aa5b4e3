"""Presentation contexts from the (SOP class, transfer syntax) pairs of a
selection: each file's own syntax in a context of its own, plus one context
per SOP class offering the uncompressed syntaxes as a fallback; at most 128
contexts per association, the contexts of one SOP class always together."""
from __future__ import annotations

import threading
from collections.abc import Iterable

from .dataset import UNCOMPRESSED

MAX_CONTEXTS = 128


def class_contexts(sop_class: str, syntaxes: Iterable[str]) -> list[tuple[str, list[str]]]:
    own = sorted(set(syntaxes))
    out = [(sop_class, [ts]) for ts in own]
    fallback = [ts for ts in UNCOMPRESSED if ts not in own]
    if fallback:
        out.append((sop_class, fallback))
    return out


class ContextPlan:
    """Groups of SOP classes, each group one association's contexts.

    Built from the selection's pairs ahead of time when they are known (the
    ``cstore`` command scans first), or grown as items arrive (a ``dicom://``
    target fed one item at a time): a pair not seen before is added to a
    group with room, whose version then changes so that its association is
    renegotiated. Thread-safe."""

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        self._lock = threading.Lock()
        self.syntaxes: dict[str, set[str]] = {}  # SOP class -> own syntaxes
        self.group_of: dict[str, int] = {}
        self.members: list[list[str]] = []  # per group: SOP classes
        self.version: list[int] = []
        for sop_class, ts in pairs:
            self._add(sop_class, ts)

    def _size(self, group: int, extra: tuple[str, str] | None = None) -> int:
        n = 0
        for c in self.members[group]:
            syntaxes = set(self.syntaxes[c])
            if extra and extra[0] == c:
                syntaxes.add(extra[1])
            n += len(class_contexts(c, syntaxes))
        if extra and extra[0] not in self.members[group]:
            n += len(class_contexts(extra[0], [extra[1]]))
        return n

    def _add(self, sop_class: str, ts: str) -> int:
        group = self.group_of.get(sop_class)
        if group is not None:
            if ts in self.syntaxes[sop_class]:
                return group
            if self._size(group, (sop_class, ts)) <= MAX_CONTEXTS:
                self.syntaxes[sop_class].add(ts)
                self.version[group] += 1
                return group
            # the class outgrew its group: move it to a group of its own
            self.members[group].remove(sop_class)
            self.version[group] += 1
            self.syntaxes[sop_class].add(ts)
            del self.group_of[sop_class]
            return self._place(sop_class)
        self.syntaxes[sop_class] = {ts}
        return self._place(sop_class)

    def _place(self, sop_class: str) -> int:
        need = len(class_contexts(sop_class, self.syntaxes[sop_class]))
        if need > MAX_CONTEXTS:
            raise ValueError(f"SOP class {sop_class} comes in {need - 1} transfer syntaxes: more than "
                             f"{MAX_CONTEXTS - 1} cannot be proposed in one association")
        for group in range(len(self.members)):
            if self._size(group) + need <= MAX_CONTEXTS:
                break
        else:
            self.members.append([])
            self.version.append(0)
            group = len(self.members) - 1
        self.members[group].append(sop_class)
        self.version[group] += 1
        self.group_of[sop_class] = group
        return group

    def group_for(self, sop_class: str, ts: str) -> tuple[int, int]:
        """The group that proposes (``sop_class``, ``ts``) and its version."""
        with self._lock:
            group = self._add(sop_class, ts)
            return group, self.version[group]

    def contexts(self, group: int) -> list[tuple[str, list[str]]]:
        with self._lock:
            return [ctx for c in self.members[group] for ctx in class_contexts(c, self.syntaxes[c])]

    def __len__(self) -> int:
        return len(self.members)
