"""Selections, the persistent "selected for backup" list, attachments and
database attributes, and that each travels through export-db / import-db
exactly as far as it should.

The database holds the whole real corpus; every expected set is computed
from ``ls --whole --json`` of that database, never written down.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dicomvault.engine import Selection
from dicomvault.plugins.embedded.database import EmbeddedDatabase


# ----------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def corpus_db(real_dicom: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("corpus")
    env = dict(os.environ, DICOMVAULT_DB=str(tmp / "unused"), DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD="1")
    proc = subprocess.run([sys.executable, "-m", "dicomvault", "--db", str(tmp / "db"), "-q", "import-dicom",
                           *real_dicom], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr
    return tmp / "db"


@pytest.fixture
def db(corpus_db: Path, tmp_path: Path) -> Path:
    """A private copy of the corpus database, free to change."""
    copy = tmp_path / "db"
    shutil.copytree(corpus_db, copy)
    return copy


def rows(cli, db: Path) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    """One row per series: the patient, study and series it belongs to."""
    result = cli("--db", db, "ls", "--whole", "--json")
    assert result.code == 0, result.err
    out = []
    for p in result.json():
        for st in p["children"]:
            for se in st["children"]:
                out.append({"patient_key": p["uid"], "patient_id": p["label"]["patient_id"],
                            "study": st["uid"], "date": st["label"]["date"], "series": se["uid"],
                            "modality": se["label"]["modality"], "instances": se["instances"]})
    return out


def instances(cli, db: Path) -> dict[str, tuple[str, str, int]]:  # type: ignore[no-untyped-def]
    """SOP UID -> (series UID, SHA-256, size)."""
    result = cli("--db", db, "ls", "--whole", "--level", "instance", "--json")
    assert result.code == 0, result.err
    return {i["uid"]: (se["uid"], i["label"]["sha256"], i["size"])
            for p in result.json() for st in p["children"] for se in st["children"] for i in se["children"]}


def selected(cli, db: Path) -> set[str]:  # type: ignore[no-untyped-def]
    result = cli("--db", db, "select", "show", "--json")
    assert result.code == 0, result.err
    return set(result.json()["series"])


def select(cli, db: Path, *args: str) -> set[str]:  # type: ignore[no-untyped-def]
    result = cli("--db", db, "select", *args, "--json")
    assert result.code == 0, result.err
    shown = set(result.json()["series"])
    assert shown == selected(cli, db), "the list printed must be the list kept"
    return shown


def day(dicom_date: str) -> str:
    """A study date as YYYYMMDD, also for the old ACR-NEMA form YYYY.MM.DD."""
    digits = re.sub(r"\D", "", dicom_date)
    return digits if len(digits) == 8 else ""


def attributes_and_attachments(db: Path) -> tuple[dict[tuple[str, str], object], dict[str, object]]:
    database = EmbeddedDatabase(db, create=False)
    source = database.source()
    try:
        attrs = {(a.level, a.uid): (a.comment, sorted(a.tags), dict(a.fields))
                 for a in source.attributes(Selection(whole=True))}
        atts = {}
        for rec, opener in source.attachments(Selection(whole=True)):
            with opener() as fh:
                atts[rec.attachment_id] = (rec, fh.read())
        return attrs, atts
    finally:
        source.close()
        database.close()


# ----------------------------------------------------------------- select
def test_select_set_by_modality_is_case_insensitive(cli, db: Path) -> None:
    everything = rows(cli, db)
    mr = {r["series"] for r in everything if str(r["modality"]).upper() == "MR"}
    assert len(mr) >= 3
    assert select(cli, db, "set", "--modality", "MR") == mr
    assert select(cli, db, "set", "--modality", "mr") == mr


def test_select_add_remove_clear_add_all(cli, db: Path) -> None:
    everything = rows(cli, db)
    ct = {r["series"] for r in everything if r["modality"] == "CT"}
    other_study = next(r["study"] for r in everything if r["modality"] == "MR")
    in_other_study = {r["series"] for r in everything if r["study"] == other_study}
    dropped = sorted(ct)[0]
    assert selected(cli, db) == set()
    assert select(cli, db, "set", "--modality", "CT") == ct
    assert select(cli, db, "add", "--study", other_study) == ct | in_other_study
    assert select(cli, db, "remove", "--series", dropped) == (ct | in_other_study) - {dropped}
    assert select(cli, db, "add-all") == {r["series"] for r in everything}
    assert select(cli, db, "clear") == set()
    assert cli("--db", db, "export-db", db.parent / "x.bkp", "--selected").code == 64


def test_select_by_patient_id_and_by_patient_key(cli, db: Path) -> None:
    everything = rows(cli, db)
    by_id: dict[str, set[str]] = {}
    keys_of_id: dict[str, set[str]] = {}
    for r in everything:
        by_id.setdefault(str(r["patient_id"]), set()).add(str(r["series"]))
        keys_of_id.setdefault(str(r["patient_id"]), set()).add(str(r["patient_key"]))
    pid = max((p for p in by_id if p and len(keys_of_id[p]) == 1), key=lambda p: len(by_id[p]))
    assert len({r["study"] for r in everything if r["patient_id"] == pid}) >= 2, "want a patient with studies"
    assert select(cli, db, "set", "--patient", pid) == by_id[pid]
    anonymous = next(r for r in everything if not r["patient_id"])
    key = str(anonymous["patient_key"])
    assert select(cli, db, "set", "--patient", key) == {r["series"] for r in everything
                                                         if r["patient_key"] == key}


def test_select_by_study_date_range(cli, db: Path) -> None:
    everything = rows(cli, db)
    days = sorted({day(str(r["date"])) for r in everything} - {""})
    assert len(days) >= 6
    lo, hi = days[len(days) // 4], days[3 * len(days) // 4]
    expected = {r["series"] for r in everything if day(str(r["date"])) and lo <= day(str(r["date"])) <= hi}
    assert expected
    assert select(cli, db, "set", "--date-from", lo, "--date-to", hi) == expected
    iso = f"{hi[:4]}-{hi[4:6]}-{hi[6:]}"
    assert select(cli, db, "set", "--date-from", lo, "--date-to", iso) == expected
    only_from = {r["series"] for r in everything if day(str(r["date"])) >= hi}
    assert select(cli, db, "set", "--date-from", hi) == only_from


def test_select_by_date_understands_old_acr_nema_dates(cli, db: Path) -> None:
    """Some real files hold study dates as YYYY.MM.DD; a date range must find them."""
    everything = rows(cli, db)
    dotted = [r for r in everything if "." in str(r["date"]) and day(str(r["date"]))]
    if not dotted:
        pytest.skip("no study with an old-style date in the installed corpus")
    target = dotted[0]
    d = day(str(target["date"]))
    got = select(cli, db, "set", "--date-from", d, "--date-to", d)
    assert target["series"] in got
    assert got == {r["series"] for r in everything if day(str(r["date"])) == d}


def test_select_kinds_narrow_each_other_values_are_alternatives(cli, db: Path) -> None:
    everything = rows(cli, db)
    days = sorted({day(str(r["date"])) for r in everything} - {""})
    middle = days[len(days) // 2]
    expected = {r["series"] for r in everything
                if r["modality"] in ("MR", "CT") and day(str(r["date"])) >= middle}
    assert expected
    got = select(cli, db, "set", "--modality", "MR", "--modality", "CT", "--date-from", middle)
    assert got == expected
    assert got < {r["series"] for r in everything if r["modality"] in ("MR", "CT")}


def test_selection_matching_nothing_changes_nothing(cli, db: Path) -> None:
    kept = select(cli, db, "set", "--modality", "CT")
    result = cli("--db", db, "select", "add", "--series", "1.2.3.4.5.6.7.8.9.0")
    assert result.code == 64
    assert "dicomvault: error:" in result.err
    assert selected(cli, db) == kept


def test_select_show_text(cli, db: Path) -> None:
    everything = rows(cli, db)
    chosen = select(cli, db, "set", "--modality", "CT")
    result = cli("--db", db, "select", "show")
    assert result.code == 0
    n = sum(int(r["instances"]) for r in everything if r["series"] in chosen)  # type: ignore[call-overload]
    assert f"{len(chosen)} series, {n} instances" in result.out
    for uid in chosen:
        assert uid in result.out


def test_export_selected_then_import_brings_exactly_the_selection(cli, db: Path, tmp_path: Path) -> None:
    everything = rows(cli, db)
    ct_study = next(r["study"] for r in everything if r["modality"] == "CT")
    chosen = select(cli, db, "set", "--modality", "MR")
    chosen = select(cli, db, "add", "--study", str(ct_study))
    assert cli("--db", db, "export-db", tmp_path / "sel.bkp", "--selected").code == 0
    restored = tmp_path / "restored"
    result = cli("--db", restored, "import-db", tmp_path / "sel.bkp", "--json")
    assert result.code == 0, result.err
    mine = {uid: v for uid, v in instances(cli, db).items() if v[0] in chosen}
    theirs = instances(cli, restored)
    assert theirs == mine
    assert {r["series"] for r in rows(cli, restored)} == chosen
    assert result.json()["counts"]["instance"] == {"stored": len(mine)}


def test_import_db_with_a_selection_brings_only_that(cli, db: Path, tmp_path: Path) -> None:
    assert cli("--db", db, "export-db", tmp_path / "all.bkp", "--whole").code == 0
    everything = rows(cli, db)
    series = max(everything, key=lambda r: int(r["instances"]))  # type: ignore[call-overload]
    study = next(r["study"] for r in everything
                 if sum(1 for o in everything if o["study"] == r["study"]) >= 2)
    mine = instances(cli, db)
    for flag, value, keep in (("--series", series["series"], lambda r: r["series"] == series["series"]),
                              ("--study", study, lambda r: r["study"] == study)):
        target = tmp_path / f"only{flag}"
        assert cli("--db", target, "import-db", tmp_path / "all.bkp", flag, str(value)).code == 0
        wanted = {r["series"] for r in everything if keep(r)}
        assert {r["series"] for r in rows(cli, target)} == wanted
        assert instances(cli, target) == {u: v for u, v in mine.items() if v[0] in wanted}


# ----------------------------------------------------------------- attach and annotate
def test_attach_records_the_file(cli, db: Path, tmp_path: Path) -> None:
    everything = rows(cli, db)
    study = str(everything[0]["study"])
    voi = tmp_path / "liver voi.csv"
    voi.write_text("roi,label,volume_ml\n1,liver,1520.5\n")
    result = cli("--db", db, "attach", voi, "--study", study, "--json")
    assert result.code == 0, result.err
    rec = result.json()
    assert (rec["level"], rec["uid"], rec["name"]) == ("study", study, voi.name)
    assert rec["size"] == voi.stat().st_size
    assert rec["sha256"] == hashlib.sha256(voi.read_bytes()).hexdigest()
    assert rec["media_type"] == "text/csv"
    _attrs, atts = attributes_and_attachments(db)
    assert atts[rec["attachment_id"]][1] == voi.read_bytes()
    blob = tmp_path / "model.bin"
    blob.write_bytes(bytes(range(256)) * 3)
    series = str(everything[-1]["series"])
    named = cli("--db", db, "attach", blob, "--series", series, "--name", "kinetics.out",
                "--media-type", "application/x-kinetics", "--json").json()
    assert (named["level"], named["uid"], named["name"], named["media_type"]) == (
        "series", series, "kinetics.out", "application/x-kinetics")


def test_attach_to_a_patient_by_id(cli, db: Path, tmp_path: Path) -> None:
    everything = rows(cli, db)
    pid, key = next((r["patient_id"], r["patient_key"]) for r in everything
                    if r["patient_id"] and sum(1 for o in everything if o["patient_id"] == r["patient_id"]
                                               and o["patient_key"] != r["patient_key"]) == 0)
    note = tmp_path / "consent.txt"
    note.write_text("signed")
    rec = cli("--db", db, "attach", note, "--patient", str(pid), "--json").json()
    assert (rec["level"], rec["uid"]) == ("patient", key)


def test_attach_to_nothing_is_a_usage_error(cli, db: Path, tmp_path: Path) -> None:
    note = tmp_path / "n.txt"
    note.write_text("x")
    before = attributes_and_attachments(db)
    for argv in (["attach", note, "--study", "1.2.3.999"], ["attach", note, "--series", "1.2.3.999"],
                 ["attach", note, "--patient", "no-such-patient-id"], ["attach", tmp_path, "--study", "1.2"]):
        result = cli("--db", db, *argv)
        assert result.code == 64, argv
        assert "dicomvault: error:" in result.err
        assert "Traceback" not in result.err
    assert attributes_and_attachments(db) == before


def test_annotate_comment_tags_fields(cli, db: Path) -> None:
    everything = rows(cli, db)
    study = str(everything[0]["study"])
    first = cli("--db", db, "annotate", "--study", study, "--comment", "motion artefact", "--tag", "qc",
                "--tag", "review", "--field", "project=liver", "--field", "reader=A=B", "--json")
    assert first.code == 0, first.err
    assert first.json() == {"level": "study", "uid": study, "comment": "motion artefact",
                            "tags": ["qc", "review"], "fields": {"project": "liver", "reader": "A=B"}}
    second = cli("--db", db, "annotate", "--study", study, "--tag", "qc", "--tag", "done",
                 "--field", "project=kidney", "--json")
    assert second.json()["comment"] == "motion artefact", "a comment stays until replaced"
    assert second.json()["tags"] == ["done", "qc", "review"]
    assert second.json()["fields"] == {"project": "kidney", "reader": "A=B"}
    cli("--db", db, "annotate", "--study", study, "--comment", "")
    attrs, _atts = attributes_and_attachments(db)
    assert attrs[("study", study)] == ("", ["done", "qc", "review"], {"project": "kidney", "reader": "A=B"})


def test_annotate_every_level(cli, db: Path) -> None:
    everything = rows(cli, db)
    r = next(r for r in everything if r["patient_id"])
    sop = next(uid for uid, v in instances(cli, db).items() if v[0] == r["series"])
    for flag, value, level, uid in (("--patient", r["patient_id"], "patient", r["patient_key"]),
                                    ("--study", r["study"], "study", r["study"]),
                                    ("--series", r["series"], "series", r["series"]),
                                    ("--instance", sop, "instance", sop)):
        result = cli("--db", db, "annotate", flag, str(value), "--field", f"level={level}", "--json")
        assert result.code == 0, result.err
        assert (result.json()["level"], result.json()["uid"]) == (level, uid)
    attrs, _atts = attributes_and_attachments(db)
    assert {k: v[2] for k, v in attrs.items()} == {
        ("patient", r["patient_key"]): {"level": "patient"}, ("study", r["study"]): {"level": "study"},
        ("series", r["series"]): {"level": "series"}, ("instance", sop): {"level": "instance"}}


def _decorate(cli, db: Path, tmp_path: Path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Attributes and attachments on two studies of different patients."""
    everything = rows(cli, db)
    a = everything[0]
    b = next(r for r in everything if r["patient_key"] != a["patient_key"] and r["patient_id"])
    for i, r in enumerate((a, b)):
        f = tmp_path / f"voi-{i}.csv"
        f.write_text(f"roi,volume\n{i},{i * 10.5}\n")
        assert cli("--db", db, "attach", f, "--study", str(r["study"])).code == 0
        assert cli("--db", db, "annotate", "--study", str(r["study"]), "--comment", f"study {i}",
                   "--tag", f"t{i}").code == 0
        assert cli("--db", db, "annotate", "--series", str(r["series"]), "--field", f"k={i}").code == 0
        assert cli("--db", db, "annotate", "--patient", str(r["patient_key"]), "--field",
                   f"cohort={i}").code == 0
    g = tmp_path / "series-blob.bin"
    g.write_bytes(random.Random(3000).randbytes(3000))
    assert cli("--db", db, "attach", g, "--series", str(b["series"])).code == 0
    return {"a_series": str(a["series"]), "b_series": str(b["series"])}


def test_attributes_and_attachments_round_trip_whole(cli, db: Path, tmp_path: Path) -> None:
    _decorate(cli, db, tmp_path)
    assert cli("--db", db, "export-db", tmp_path / "all.bkp", "--whole").code == 0
    restored = tmp_path / "restored"
    result = cli("--db", restored, "import-db", tmp_path / "all.bkp", "--json")
    assert result.code == 0, result.err
    assert attributes_and_attachments(restored) == attributes_and_attachments(db)
    attrs, atts = attributes_and_attachments(restored)
    assert len(attrs) == 6 and len(atts) == 3


def test_attributes_and_attachments_follow_the_selection(cli, db: Path, tmp_path: Path) -> None:
    """A partial export carries what belongs to the chosen series and to the
    study and patient holding them, and nothing of other patients."""
    picked = _decorate(cli, db, tmp_path)
    assert cli("--db", db, "export-db", tmp_path / "b.bkp", "--series", picked["b_series"]).code == 0
    restored = tmp_path / "restored"
    assert cli("--db", restored, "import-db", tmp_path / "b.bkp").code == 0
    everything = rows(cli, db)
    b = next(r for r in everything if r["series"] == picked["b_series"])
    owners = {("patient", b["patient_key"]), ("study", b["study"]), ("series", b["series"])}
    attrs, atts = attributes_and_attachments(db)
    got_attrs, got_atts = attributes_and_attachments(restored)
    assert got_attrs == {k: v for k, v in attrs.items() if k in owners}
    assert got_atts == {k: v for k, v in atts.items() if (v[0].level, v[0].uid) in owners}  # type: ignore[attr-defined]
    assert len(got_atts) == 2 and len(got_attrs) == 3
