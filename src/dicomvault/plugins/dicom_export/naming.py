"""One name policy for folders, files and zip entries.

Names are Unicode (NFC) but valid on Linux, macOS and Windows: no ``/ \\ : *
? " < > |``, no control or unpaired surrogate characters, no trailing dot or
space, no reserved device names (CON, NUL, COM1...), no ``.``/``..``, and a
length budget per component and per path. Collisions (compared case-folded,
as on macOS and Windows) are separated by a deterministic suffix derived
from the identity of the thing named, never from arrival order alone.

DICOMDIR File IDs use a stricter alphabet: 1 to 8 of ``A-Z 0-9 _``.
"""
from __future__ import annotations

import functools
import hashlib
import re
import unicodedata

FORBIDDEN = set('/\\:*?"<>|')
RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
            *(f"COM{i}" for i in "123456789¹²³"), *(f"LPT{i}" for i in "123456789¹²³")}
COMPONENT_MAX = 60  # characters; also <= 255 UTF-8 bytes (checked)
PATH_MAX = 200  # characters of the path below OUTDIR: leaves room under Windows' 260
FILE_ID_MAX = 8
_FILE_ID_OK = re.compile(r"[A-Z0-9_]")
_SPACES = re.compile(r"[\s_]{2,}")


def suffix_for(identity: str, n: int = 6) -> str:
    """A short deterministic tag for ``identity`` (a patient key, a UID)."""
    return hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def _clean_char(ch: str) -> str:
    if ch in FORBIDDEN:
        return "_"
    cat = unicodedata.category(ch)
    if cat in ("Cc", "Cs", "Co", "Cn") or (cat == "Cf" and ch != "\u200d"):
        return "_"
    if cat in ("Zl", "Zp") or ch in "\t\r\n":
        return " "
    return ch


def _truncate(name: str, limit: int) -> str:
    name = name[:limit]
    while len(name.encode("utf-8", "surrogatepass")) > 255:
        name = name[:-1]
    return name


@functools.lru_cache(maxsize=1 << 16)  # pure; the same folder names come once per instance
def sanitize(value: str, fallback: str, limit: int = COMPONENT_MAX) -> str:
    """A valid file or folder name from ``value`` (``fallback`` if nothing is left).

    Keeps an extension (the part after the last dot, when short) through
    truncation, so ``.dcm`` survives.
    """
    text = unicodedata.normalize("NFC", value)
    text = "".join(_clean_char(c) for c in text)
    text = _SPACES.sub(lambda m: "_" if "_" in m.group() else " ", text).strip(" _").lstrip(".")
    stem, dot, ext = text.rpartition(".")
    if not dot or not stem or len(ext) > 8 or not ext.isalnum():
        stem, ext = text, ""
    stem = stem.rstrip(". ")
    if not stem.strip(". _"):
        stem = fallback
    budget = max(1, limit - (len(ext) + 1 if ext else 0))
    stem = _truncate(stem, budget).rstrip(". ")
    if stem.split(".")[0].upper() in RESERVED:
        stem = "_" + stem
    return f"{stem}.{ext}" if ext else stem


def with_suffix(name: str, tag: str, limit: int = COMPONENT_MAX) -> str:
    """``name`` with ``_tag`` before its extension, within ``limit``."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext) > 8:
        stem, ext = name, ""
    room = limit - len(tag) - 1 - (len(ext) + 1 if ext else 0)
    stem = _truncate(stem, max(1, room)).rstrip(". ")
    return f"{stem}_{tag}.{ext}" if ext else f"{stem}_{tag}"


@functools.lru_cache(maxsize=1 << 16)
def file_id(value: str, fallback: str) -> str:
    """A DICOMDIR File ID component: 1-8 of ``A-Z 0-9 _``, from ``value``
    (accents folded, everything else dropped)."""
    folded = unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode().upper()
    out = "".join(c if _FILE_ID_OK.fullmatch(c) else ("_" if c in " -._^" else "") for c in folded)
    out = re.sub("_+", "_", out).strip("_")[:FILE_ID_MAX].rstrip("_")
    return out or fallback[:FILE_ID_MAX]


def file_id_with_suffix(name: str, tag: str) -> str:
    """``name`` with its tail replaced by ``tag`` (uppercase), still <= 8."""
    tag = tag.upper()
    return name[: max(0, FILE_ID_MAX - len(tag))] + tag


def fileset_id(value: str) -> str:
    """A File-set ID: up to 16 of ``A-Z 0-9 _ space`` (CS repertoire)."""
    folded = unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode().upper()
    out = "".join(c if (c.isalnum() and c.isascii()) or c in " _" else "_" for c in folded)
    return re.sub(" +", " ", out).strip()[:16].strip()


class NameAllocator:
    """Hands out names within each folder so that different things never share
    one. ``allocate(parent, wanted, owner)`` returns the name for ``owner``
    (an identity: patient key, UID) in folder ``parent``: the same owner
    always gets the same name; a different owner whose wanted name is taken
    (compared case-folded) gets ``wanted`` with a suffix from its identity.
    """

    def __init__(self, *, dicom_file_ids: bool = False) -> None:
        self.dicom = dicom_file_ids
        self.taken: dict[tuple[str, str], str] = {}  # (parent, folded name) -> owner
        self.given: dict[tuple[str, str], str] = {}  # (parent, owner) -> name

    def _fold(self, name: str) -> str:
        return unicodedata.normalize("NFC", name).casefold()

    def allocate(self, parent: str, wanted: str, owner: str) -> str:
        known = self.given.get((parent, owner))
        if known is not None:
            return known
        name = wanted
        attempt = 0
        while self.taken.get((parent, self._fold(name)), owner) != owner:
            attempt += 1
            tag = suffix_for(owner if attempt == 1 else f"{owner}\0{attempt}", 6 if not self.dicom else 4)
            name = file_id_with_suffix(wanted, tag) if self.dicom else with_suffix(wanted, tag)
        self.taken[(parent, self._fold(name))] = owner
        self.given[(parent, owner)] = name
        return name

    def reserve(self, parent: str, name: str, owner: str) -> None:
        """Mark ``name`` in ``parent`` as used by ``owner`` (something already on disk)."""
        self.taken.setdefault((parent, self._fold(name)), owner)
