"""Where the passphrase of an encrypted .bkp file comes from: an environment
variable (``--passphrase-env VAR``), a file (``--passphrase-file PATH``) or,
in a terminal, a prompt. The passphrase is never logged nor echoed."""
from __future__ import annotations

import argparse
import getpass
import os
import sys
from dataclasses import dataclass, field

from .errors import PassphraseRequiredError, UsageError

HOW = "--passphrase-env VAR or --passphrase-file PATH, or run in a terminal to be asked for it"


def add_passphrase_options(parser: argparse.ArgumentParser, *, encrypt: bool = False) -> None:
    g = parser.add_argument_group("encryption (.bkp files)")
    if encrypt:
        g.add_argument("--encrypt", action="store_true",
                       help="encrypt the .bkp file (AES-256-GCM, key from a passphrase); without "
                            "--passphrase-env or --passphrase-file the passphrase is asked twice")
    g.add_argument("--passphrase-env", metavar="VAR",
                   help="read the passphrase from the environment variable VAR")
    g.add_argument("--passphrase-file", metavar="PATH",
                   help="read the passphrase from PATH (its first line; a trailing newline is dropped)")


def _interactive() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


@dataclass
class PassphraseSource:
    """The command line's choice; resolved at most once per command."""

    env: str | None = None
    file: str | None = None
    encrypt: bool = False
    _cached: str | None = field(default=None, repr=False)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PassphraseSource:
        env, file = getattr(args, "passphrase_env", None), getattr(args, "passphrase_file", None)
        if env and file:
            raise UsageError("give one of --passphrase-env and --passphrase-file, not both")
        return cls(env=env, file=file, encrypt=bool(getattr(args, "encrypt", False)))

    @property
    def given(self) -> bool:
        return bool(self.env or self.file)

    def get(self, what: str, *, confirm: bool = False, ask: bool = True) -> str | None:
        """The passphrase for ``what``: from the variable or file, else asked (twice with
        ``confirm``) in a terminal. None when none was given and ``ask`` is false."""
        if self._cached is not None:
            return self._cached
        if self.env:
            value = os.environ.get(self.env)
            if not value:
                raise UsageError(f"the environment variable {self.env} (--passphrase-env) is not set "
                                 "or empty")
        elif self.file:
            try:
                with open(self.file, encoding="utf-8") as fh:
                    value = fh.readline().removesuffix("\n").removesuffix("\r")
            except OSError as exc:
                raise UsageError(f"cannot read the passphrase file {self.file}: {exc.strerror}") from exc
            except UnicodeDecodeError as exc:
                raise UsageError(f"the passphrase file {self.file} is not UTF-8 text") from exc
            if not value:
                raise UsageError(f"the passphrase file {self.file} is empty")
        elif not ask:
            return None
        elif not _interactive():
            raise PassphraseRequiredError(f"{what} needs a passphrase: give it with {HOW}")
        else:
            value = getpass.getpass(f"Passphrase for {what}: ")
            if not value:
                raise UsageError("the passphrase is empty")
            if confirm and getpass.getpass("The same passphrase again: ") != value:
                raise UsageError("the two passphrases differ; nothing was written")
        self._cached = value
        return value
