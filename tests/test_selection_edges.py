"""Edges a new user hit: selections that match nothing, attributes and
attachments whose images are gone, salvage with nothing to keep, special
files as outputs."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from dicomvault.formats.bkp.validate import verify


@pytest.fixture
def one_ct(cli, tmp_path: Path, pydicom_files: Path) -> Path:  # type: ignore[no-untyped-def]
    db = tmp_path / "db"
    assert cli("--db", db, "-q", "import-dicom", pydicom_files / "CT_small.dcm").code == 0
    return db


@pytest.mark.parametrize("command", [
    ["export-db", "{tmp}/empty.bkp", "--series", "9.9.9"],
    ["export-db", "{tmp}/empty.bkp", "--modality", "ZZ"],
    ["export-dicom", "{tmp}/out", "--series", "9.9.9"],
    ["replicate", "--to", "{tmp}/other", "--series", "9.9.9"],
])
def test_a_selection_that_matches_nothing_is_an_error(cli, one_ct: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                      command: list[str]) -> None:
    args = [a.format(tmp=tmp_path) for a in command]
    res = cli("--db", one_ct, *args)
    assert res.code == 64, res.out + res.err
    assert "matches nothing" in res.err
    assert not (tmp_path / "empty.bkp").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".empty.bkp")]


def test_import_of_a_series_not_in_the_backup_is_an_error(cli, one_ct: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bkp = tmp_path / "all.bkp"
    assert cli("--db", one_ct, "-q", "export-db", bkp, "--whole").code == 0
    res = cli("--db", tmp_path / "fresh", "import-db", bkp, "--series", "9.9.9")
    assert res.code == 64 and "matches nothing" in res.err
    assert cli("--db", tmp_path / "fresh2", "-q", "import-db", bkp, "--whole").code == 0  # whole: fine


def test_attributes_of_a_patient_whose_images_moved_away(cli, one_ct: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """After move, the source keeps the patient's attributes and attachments but
    no image: exporting that patient names them as not written, and the .bkp
    stays valid (nothing in it refers to a patient it does not hold)."""
    patient = cli("--db", one_ct, "--json", "ls", "--level", "patient").json()[0]["uid"]
    assert cli("--db", one_ct, "-q", "annotate", "--patient", patient, "--comment", "c").code == 0
    note = tmp_path / "note.txt"
    note.write_text("n")
    study = cli("--db", one_ct, "--json", "ls", "--level", "study").json()[0]["children"][0]["uid"]
    assert cli("--db", one_ct, "-q", "attach", "--study", study, note).code == 0
    moved = cli("--db", one_ct, "--json", "move", "--to", tmp_path / "elsewhere", "--whole")
    assert moved.code == 0, moved.out
    out = tmp_path / "left.bkp"
    res = cli("--db", one_ct, "--json", "export-db", out, "--patient", patient)
    report = res.json()
    assert res.code == 2, res.out  # nothing could be written: failed, each item named
    failed = [p for p in report["problems"] if p["outcome"] == "failed"]
    assert failed and all("holds no instance in this backup" in p["reason"] for p in failed)
    assert verify(out).valid


def test_salvage_with_nothing_to_keep_writes_nothing(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    junk = tmp_path / "junk.bkp"
    # a header start (version 1.0, no flags), then bytes that hold no frame
    junk.write_bytes(b"\x89DVBKP\r\n" + b"\x01\x00\x00\x00" + bytes(4) + random.Random(1).randbytes(5000))
    out = tmp_path / "out.bkp"
    res = cli("bkp", "salvage", junk, out)
    assert res.code == 2
    assert not out.exists()


def test_special_files_are_never_replaced(cli, one_ct: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fifo = tmp_path / "pipe.bkp"
    os.mkfifo(fifo)
    res = cli("--db", one_ct, "export-db", fifo, "--whole", "--force")
    assert res.code == 64 and "not a regular file" in res.err
    assert fifo.is_fifo()


def test_a_layout_that_climbs_is_refused(cli, one_ct: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    res = cli("--db", one_ct, "export-dicom", tmp_path / "out", "--whole",
              "--layout", "../{SOPInstanceUID}.dcm")
    assert res.code == 64 and "'..'" in res.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]


def test_move_to_dicom_media_keeps_what_had_to_be_converted(  # type: ignore[no-untyped-def]
        cli, tmp_path: Path, pydicom_files: Path) -> None:
    db = tmp_path / "db"
    for name in ("CT_small.dcm", "MR_small_implicit.dcm"):  # explicit LE: copied; implicit: converted
        assert cli("--db", db, "-q", "import-dicom", pydicom_files / name).code == 0
    media = f"dicom-folder:{tmp_path / 'media'}?dicomdir=1"
    res = cli("--db", db, "--json", "move", "--to", media, "--whole")
    report = res.json()
    assert report["counts"]["instance"] == {"converted": 1, "stored": 1}, res.out
    assert res.code == 1
    left = cli("--db", db, "--json", "ls", "--level", "instance").json()
    uids = [i["uid"] for p in left for st in p["children"] for se in st["children"] for i in se["children"]]
    assert uids == report["details"]["left in source"] and len(uids) == 1
