"""The manifest: what a .bkp holds and where (SPEC.md, section "Manifest").

Encoded with msgspec as MessagePack, stored in a zstd frame of type 2. New
fields are only ever added, with defaults; readers ignore fields they do not
know (msgspec does so by default), which is how minor versions stay
readable.
"""
from __future__ import annotations

import msgspec

from dicomvault.engine import (
    AttachmentRecord,
    Attributes,
    InstanceRecord,
    PatientRecord,
    SeriesRecord,
    StudyRecord,
)

# Features this release can read. A file that lists another one under
# required_features is refused with a message naming it.
FEATURE_ENCRYPTION = "aes-256-gcm"  # frames and manifest sealed with AES-256-GCM (SPEC.md section 17)
FEATURE_VOLUMES = "volumes"  # the file is one volume of a set (SPEC.md section 18; see volumes.py)
FEATURE_PAGES = "manifest-pages"  # instance entries in page frames (1.1, SPEC.md section "Manifest pages")
KNOWN_FEATURES: frozenset[str] = frozenset({FEATURE_ENCRYPTION, FEATURE_VOLUMES, FEATURE_PAGES})


class FrameEntry(msgspec.Struct, array_like=True, frozen=True):
    """A data frame: where it starts in the file and where its content
    starts in the payload stream (the concatenation of all frames' content)."""

    offset: int
    stored: int
    raw: int
    codec: int
    stream_offset: int


class Blob(msgspec.Struct, array_like=True, frozen=True):
    """A byte range of the payload stream."""

    offset: int
    length: int


class InstanceEntry(msgspec.Struct, frozen=True):
    record: InstanceRecord
    blob: Blob


class AttachmentEntry(msgspec.Struct, frozen=True):
    record: AttachmentRecord
    blob: Blob


class PageEntry(msgspec.Struct, array_like=True, frozen=True):
    """A page frame: a run of instance entries kept out of the manifest, so
    that neither writer nor reader ever holds all of them (SPEC.md section
    "Manifest pages")."""

    offset: int  # absolute offset of the page frame's header
    stored: int
    raw: int
    codec: int
    count: int  # entries in the page
    series: list[str]  # distinct Series Instance UIDs of its entries, in order of first appearance


class Volume(msgspec.Struct, kw_only=True):
    """Where a file stands in a volume set (SPEC.md section "Volumes")."""

    set_id: str  # 32 lowercase hex digits, the same in every volume of the set
    index: int  # 1-based
    last: bool = False  # true on the final volume only


class Manifest(msgspec.Struct, kw_only=True):
    format: str = "dicomvault-bkp"
    major: int
    minor: int
    writer: str
    created: str
    required_features: list[str] = msgspec.field(default_factory=list)
    optional_features: list[str] = msgspec.field(default_factory=list)
    frames: list[FrameEntry] = msgspec.field(default_factory=list)
    patients: list[PatientRecord] = msgspec.field(default_factory=list)
    studies: list[StudyRecord] = msgspec.field(default_factory=list)
    series: list[SeriesRecord] = msgspec.field(default_factory=list)
    instances: list[InstanceEntry] = msgspec.field(default_factory=list)
    attributes: list[Attributes] = msgspec.field(default_factory=list)
    attachments: list[AttachmentEntry] = msgspec.field(default_factory=list)
    # Absent (not even written as nil) in a file that is not a volume, so such
    # files are byte for byte what a writer without volumes produces.
    volume: Volume | msgspec.UnsetType = msgspec.UNSET
    # Absent in a file without pages (every 1.0 file): its instances are all in ``instances``.
    pages: list[PageEntry] | msgspec.UnsetType = msgspec.UNSET


encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Manifest)
page_decoder = msgspec.msgpack.Decoder(list[InstanceEntry])
