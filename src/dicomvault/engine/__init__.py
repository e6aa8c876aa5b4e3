"""The public API for plugins and scripts. Import from here, not from the
submodules: names here keep working across minor releases."""
from .context import Context, default_database_url
from .errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    ChecksumError,
    ConflictError,
    CorruptError,
    DatabaseError,
    DicomvaultError,
    FormatError,
    NotABackupError,
    PassphraseError,
    PassphraseRequiredError,
    PluginError,
    TargetError,
    TruncatedError,
    UnsupportedFeatureError,
    UnsupportedVersionError,
    UsageError,
    VolumeSetError,
    WrongPassphraseError,
)
from .hookspecs import hookimpl
from .interfaces import Database, Kind, Operation, ReadAheadTarget, Source, Target, TreeNode
from .leftovers import writer_is_gone, writer_tag
from .manager import Hooks, make_plugin_manager
from .run import sha256_of, transfer
from .types import (
    AttachmentRecord,
    Attributes,
    ConflictPolicy,
    Event,
    FileOpener,
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
    patient_key,
    read_ahead,
    stream_views,
)

__all__ = [
    "EXIT_FAILED", "EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE", "AttachmentRecord", "Attributes",
    "ChecksumError", "ConflictError", "ConflictPolicy", "Context", "CorruptError", "Database",
    "DatabaseError", "DicomvaultError", "Event", "FileOpener", "FormatError", "Hooks", "InstanceRecord",
    "Item", "Kind", "Level", "NotABackupError", "Opener", "Operation", "Outcome", "PassphraseError",
    "PassphraseRequiredError", "PatientRecord", "PluginError", "ReadAheadTarget", "Rejected", "Report",
    "Selection", "SeriesRecord", "Source", "StudyRecord", "Target", "TargetError", "TreeNode",
    "TruncatedError", "UnsupportedFeatureError", "UnsupportedVersionError", "UsageError",
    "VolumeSetError", "WrongPassphraseError", "default_database_url", "hookimpl", "make_plugin_manager",
    "patient_key", "read_ahead", "sha256_of", "stream_views", "transfer", "writer_is_gone", "writer_tag",
]
