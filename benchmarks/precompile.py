"""Byte-compile dicomvault before timing it, as a regular ``pip install``
does. Without this, an editable install under ``PYTHONDONTWRITEBYTECODE``
(set on some CI machines and here) compiles every module from source on
every start, which adds about 0.15 s to each command and would be measured
as dicomvault's time."""
from __future__ import annotations

import compileall
import importlib.util
from pathlib import Path


def precompile() -> None:
    spec = importlib.util.find_spec("dicomvault")
    if spec is None or not spec.submodule_search_locations:
        return
    for folder in spec.submodule_search_locations:
        compileall.compile_dir(Path(folder), quiet=1)
