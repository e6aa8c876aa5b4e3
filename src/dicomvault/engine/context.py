"""What an operation gets to work with: the hooks, the chosen database, and
helpers that turn addresses into sources, targets and databases."""
from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import platformdirs

from .interfaces import Database, Source, Target
from .manager import Hooks
from .passphrase import PassphraseSource
from .types import Event


def default_database_url() -> str:
    """``$DICOMVAULT_DB``, else the platform's user data directory."""
    env = os.environ.get("DICOMVAULT_DB")
    if env:
        return env
    return str(Path(platformdirs.user_data_dir("dicomvault")) / "db")


class Context:
    def __init__(self, hooks: Hooks, db_url: str | None = None, *, json_output: bool = False,
                 quiet: bool = False) -> None:
        self.hooks = hooks
        self.db_url = db_url or default_database_url()
        self.json_output = json_output
        self.quiet = quiet
        self.force = False  # replace existing output files (``--force``)
        self.volume_size: int | None = None  # split a .bkp output into volumes (``--volume-size``)
        self.passphrase = PassphraseSource()  # encrypted .bkp files (``--encrypt``, ``--passphrase-*``)
        self.item_lines = True  # print one line per problem item (the demo summarises instead)
        self._databases: list[Database] = []
        self.create_database = False  # set by open_database(create=True) while a kind opens one

    def emit(self, event: Event) -> None:
        self.hooks.on_event(event)

    def open_database(self, url: str | None = None, *, create: bool = False) -> Database:
        """The database at ``url`` (default: the chosen one). Only commands that
        store into it pass ``create=True``: for the others a mistyped ``--db``
        must be an error, not a new, empty database. A kind that can create
        databases reads ``ctx.create_database`` in its ``open``."""
        url = url or self.db_url
        kind = self.hooks.find(self.hooks.databases(), url, "database")
        self.create_database = create
        try:
            db = cast(Database, kind.open(url, self))
        finally:
            self.create_database = False
        self._databases.append(db)
        return db

    def open_source(self, url: str) -> Source:
        kind = self.hooks.find(self.hooks.sources(), url, "source")
        return cast(Source, kind.open(url, self))

    def open_target(self, url: str) -> Target:
        kind = self.hooks.find(self.hooks.targets(), url, "target")
        return cast(Target, kind.open(url, self))

    def close(self) -> None:
        while self._databases:
            self._databases.pop().close()
