"""Orthanc (the Debian package, our own config, loopback, temporary storage)
as a source and a target through its REST API: embedded to Orthanc and back,
compared instance by instance (SHA-256 of the stored bytes) and attribute by
attribute where both sides hold them; attachments reported by name as not
transferred; instances stored by others; move in both directions."""
from __future__ import annotations

import hashlib
import json
import urllib.request
from pathlib import Path

import pytest

from replicas import catalog, verified
from test_replicate import annotated, fresh_copy  # noqa: F401  (a fixture and a helper)
from test_roundtrip import run


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD", "1")


def orthanc_files(server) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """SOP UID -> SHA-256 of every file Orthanc serves, read with urllib alone."""
    out = {}
    with urllib.request.urlopen(server.url + "/instances?expand") as resp:
        for info in json.load(resp):
            with urllib.request.urlopen(f"{server.url}/instances/{info['ID']}/file") as f:
                out[info["MainDicomTags"]["SOPInstanceUID"]] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_embedded_to_orthanc_and_back(annotated: Path, orthanc_server, tmp_path: Path) -> None:  # noqa: F811
    src = fresh_copy(annotated, tmp_path)
    want = catalog(src)
    url = "orthanc+" + orthanc_server.url
    res = run("--db", src, "replicate", "--to", url, "--whole", "--json")
    assert res.code == 1, res.err  # the attachment has no place in Orthanc
    report = res.json()
    assert report["counts"]["instance"] == {"stored": len(want["instances"])}
    assert report["counts"]["attributes"] == {"stored": len(want["attributes"])}
    (att_id, att), = want["attachments"].items()
    assert [(p["item"], p["outcome"]) for p in report["problems"]] == [(att_id, "rejected")]
    assert att[3] in report["problems"][0]["reason"]  # named
    assert orthanc_files(orthanc_server) == verified(src)

    again = run("--db", src, "replicate", "--to", url, "--whole", "--json").json()
    assert again["counts"]["instance"] == {"unchanged": len(want["instances"])}
    assert again["counts"]["attributes"] == {"unchanged": len(want["attributes"])}

    back = tmp_path / "back"
    res = run("replicate", "--from", url, "--to", back, "--whole", "--json")
    assert res.code == 0, res.err
    got = catalog(back)
    for table in ("patients", "studies", "series", "instances", "attributes"):
        assert got[table] == want[table], table
    assert got["attachments"] == {}
    assert verified(back) == verified(src)


def test_instances_stored_by_others(pydicom_files: Path, orthanc_server, tmp_path: Path) -> None:
    """Uploaded straight to Orthanc (no dicomvault metadata): records from
    Orthanc's tags, bytes verified, and move takes them out of Orthanc."""
    sent = {}
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm"):
        data = (pydicom_files / name).read_bytes()
        req = urllib.request.Request(orthanc_server.url + "/instances", data=data, method="POST")
        with urllib.request.urlopen(req) as resp:
            assert json.load(resp)["Status"] == "Success"
        sent[hashlib.sha256(data).hexdigest()] = name
    url = "orthanc+" + orthanc_server.url
    dst = tmp_path / "dst"
    res = run("move", "--from", url, "--to", dst, "--whole", "--json")
    assert res.code == 0, res.err
    assert res.json()["details"]["moved"] == 3
    assert set(verified(dst).values()) == set(sent)
    assert orthanc_files(orthanc_server) == {}
    ct = run("--db", tmp_path / "ct", "import-dicom", pydicom_files / "CT_small.dcm")
    assert ct.code == 0
    mine = catalog(tmp_path / "ct")
    got = catalog(dst)
    for table in ("patients", "studies", "series"):  # what Orthanc's main tags hold, the same
        for key, row in mine[table].items():
            assert got[table][key] == row, table


def test_move_embedded_to_orthanc(annotated: Path, orthanc_server, tmp_path: Path) -> None:  # noqa: F811
    src = fresh_copy(annotated, tmp_path)
    original = verified(src)
    res = run("--db", src, "move", "--to", "orthanc+" + orthanc_server.url, "--whole", "--json")
    assert res.code == 1  # the attachment stays behind, reported
    assert res.json()["details"]["moved"] == len(original)
    assert catalog(src)["instances"] == {}
    assert orthanc_files(orthanc_server) == original
