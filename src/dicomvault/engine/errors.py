"""Error classes. Each carries its own exit code and a message fit for a user.

Messages name the item (a UID, a file path, a position) but never a patient's
name, ID or birth date.
"""
from __future__ import annotations

# Exit codes shared by every command (documented in the README).
EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_FAILED = 2
EXIT_USAGE = 64  # sysexits.h EX_USAGE


class DicomvaultError(Exception):
    """Base of every error the engine raises on purpose."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(DicomvaultError):
    """The command line asks for something impossible or contradictory."""

    exit_code = EXIT_USAGE


class PluginError(DicomvaultError):
    """A plugin is missing, broken or does not honour its contract."""


class DatabaseError(DicomvaultError):
    """The database cannot be opened or is not in a usable state."""


class TargetError(DicomvaultError):
    """The target can take nothing more (its disk is full, a write failed):
    the whole run stops instead of failing every later item one by one, and
    the target keeps nothing half-written."""


class ConflictError(DicomvaultError):
    """Conflicting content under one identifier, with policy ``fail``."""


class FormatError(DicomvaultError):
    """A .bkp file cannot be read. Subclasses say why."""


class NotABackupError(FormatError):
    """The file does not start with the .bkp magic."""


class TruncatedError(FormatError):
    """The file ends before the structure it announces."""


class ChecksumError(FormatError):
    """Stored bytes do not match their checksum."""


class UnsupportedVersionError(FormatError):
    """The file was written by a newer, incompatible major version."""


class UnsupportedFeatureError(FormatError):
    """The file needs a feature this release does not implement."""


class CorruptError(FormatError):
    """The structure is inconsistent (bad lengths, bad references)."""


class VolumeSetError(FormatError):
    """A volume set is incomplete or mixed: a volume is missing, belongs to
    another set, or does not stand where its name says."""


class PassphraseError(DicomvaultError):
    """An encrypted .bkp file cannot be opened with the passphrase at hand.

    Not a ``FormatError``: the file may be perfectly sound; what is missing
    or wrong is the key. Subclasses say which.
    """


class PassphraseRequiredError(PassphraseError):
    """The .bkp file is encrypted and no passphrase was given."""

    exit_code = EXIT_USAGE


class WrongPassphraseError(PassphraseError):
    """The passphrase does not open this encrypted .bkp file (its key check fails)."""
