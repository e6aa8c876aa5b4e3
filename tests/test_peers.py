"""The peers start, answer and stop (by PID): a broken peer setup shows up
here first, not as a confusing failure in a feature test."""
from __future__ import annotations

import json
import os
import subprocess
import urllib.request


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_storescp_answers_echo(storescp_server) -> None:  # type: ignore[no-untyped-def]
    res = subprocess.run(["echoscu", "-aec", storescp_server.aet, "127.0.0.1", str(storescp_server.port)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert _alive(storescp_server.pid)


def test_orthanc_answers_rest(orthanc_server) -> None:  # type: ignore[no-untyped-def]
    with urllib.request.urlopen(orthanc_server.url + "/system", timeout=10) as r:
        system = json.load(r)
    assert system["DicomAet"] == orthanc_server.aet
    assert system["DicomPort"] == orthanc_server.dicom_port


def test_postgres_answers_sql(postgres_server) -> None:  # type: ignore[no-untyped-def]
    res = subprocess.run(["psql", postgres_server.dsn, "-Atc", "select 40 + 2"], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "42"
