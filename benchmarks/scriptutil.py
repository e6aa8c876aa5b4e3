"""Helpers shared by the side-by-side scripts.

``precompile()`` byte-compiles dicomvault before timing it, as a regular ``pip install``
does. Without this, an editable install under ``PYTHONDONTWRITEBYTECODE``
(set on some CI machines and here) compiles every module from source on
every start, which adds about 0.15 s to each command and would be measured
as dicomvault's time."""
from __future__ import annotations

import compileall
import importlib.util
import subprocess
import sys
from pathlib import Path


def precompile() -> None:
    spec = importlib.util.find_spec("dicomvault")
    if spec is None or not spec.submodule_search_locations:
        return
    for folder in spec.submodule_search_locations:
        compileall.compile_dir(Path(folder), quiet=1)


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a command that must succeed; exit with its output when it does not."""
    res = subprocess.run(argv, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if res.returncode != 0:
        sys.exit(f"{' '.join(map(str, argv))} failed ({res.returncode}):\n"
                 f"{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return res  # type: ignore[no-any-return]
