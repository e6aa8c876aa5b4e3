"""Real peers for the tests: DCMTK storescp, Orthanc and PostgreSQL, each
started on 127.0.0.1 on a free port by the scripts in ``tools/`` and stopped
by PID. No mocks: when a peer is missing the test fails and says how to
install it (``tools/peers-setup.sh``, which ``.ci/run`` calls)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def require(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None and not Path(p).exists()]
    if missing:
        raise RuntimeError(f"missing peer program(s) {', '.join(missing)}: run tools/peers-setup.sh "
                           "as root (.ci/run does)")


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k] = v.strip("'")
    return out


def _run(*args: str | os.PathLike[str]) -> None:
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({res.returncode}): {res.stderr[-2000:]}")


@dataclass(frozen=True)
class StoreSCP:
    port: int
    aet: str
    received: Path  # where storescp writes what arrives (flat, <MOD>.<SOPUID>)
    pid: int


@contextmanager
def storescp(workdir: Path, aet: str = "STORESCP", args: str = "") -> Iterator[StoreSCP]:
    """DCMTK storescp accepting every SOP class and transfer syntax; ``args``:
    extra storescp options (e.g. ``+B``: write what arrives byte for byte)."""
    require("storescp", "echoscu")
    res = subprocess.run(["bash", str(TOOLS / "storescp-start.sh"), str(workdir), "", aet],  # "": a free port
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "STORESCP_ARGS": args})
    if res.returncode != 0:
        raise RuntimeError(f"storescp did not start: {res.stderr[-2000:]}")
    env = _env_file(workdir / "env")
    try:
        yield StoreSCP(int(env["STORESCP_PORT"]), env["STORESCP_AET"], workdir / "in",
                       int(env["STORESCP_PID"]))
    finally:
        _run("bash", TOOLS / "stop-pidfile.sh", workdir / "storescp.pid", "10")


@dataclass(frozen=True)
class Orthanc:
    url: str  # http://127.0.0.1:PORT (REST API)
    dicom_port: int
    aet: str
    pid: int
    storage: Path


@contextmanager
def orthanc(workdir: Path, **env: str) -> Iterator[Orthanc]:
    """A private Orthanc (Debian package) with its own config and storage.
    ``env`` passes the knobs of tools/orthanc-start.sh (ORTHANC_AET...)."""
    require("Orthanc", "curl")
    res = subprocess.run(["bash", str(TOOLS / "orthanc-start.sh"), str(workdir)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, **env})
    if res.returncode != 0:
        raise RuntimeError(f"Orthanc did not start: {res.stderr[-2000:]}")
    e = _env_file(workdir / "env")
    try:
        yield Orthanc(e["ORTHANC_URL"], int(e["ORTHANC_DICOM_PORT"]), e["ORTHANC_AET"],
                      int(e["ORTHANC_PID"]), workdir / "storage")
    finally:
        _run("bash", TOOLS / "orthanc-stop.sh", workdir)


@dataclass(frozen=True)
class Postgres:
    dsn: str  # postgresql://postgres@127.0.0.1:PORT/DB
    host: str
    port: int
    user: str
    database: str
    pid: int


@contextmanager
def postgres(database: str = "dicomtest") -> Iterator[Postgres]:
    """A throw-away PostgreSQL cluster on 127.0.0.1 (trust auth, fsync off:
    tests only). Its folder lives outside pytest's private tmp tree because
    the server runs as the 'postgres' user when we are root."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not bins:
        raise RuntimeError("PostgreSQL server missing: run tools/peers-setup.sh as root (.ci/run does)")
    state = Path(tempfile.mkdtemp(prefix="dicomvault-pg-"))
    state.chmod(0o755)
    try:
        _run("bash", TOOLS / "pg-start.sh", state, "", database)  # "": a free port
        e = _env_file(state / "env")
        yield Postgres(e["PG_DSN"], e["PGHOST"], int(e["PGPORT"]), e["PGUSER"], e["PGDATABASE"],
                       int(e["PG_PID"]))
    finally:
        _run("bash", str(TOOLS / "pg-stop.sh"), state)
        shutil.rmtree(state, ignore_errors=True)
