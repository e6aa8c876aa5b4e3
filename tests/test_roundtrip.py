"""Export Database / Import Database end to end on the real DICOM shipped in
pydicom and pydicom-data.

Every check is made twice: once with ``dicomvault compare`` and once by
reading both databases directly (SQLite catalog and content store, with
nothing but ``sqlite3`` and ``hashlib``), so that a bug in ``compare``
cannot hide a bug in ``import-db``.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dicomvault.cli.main import main
from dicomvault.formats.bkp.reader import BkpReader

# ---------------------------------------------------------------------- helpers


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> dict:
        return json.loads(self.out)


def run(*args: object) -> Run:
    """``dicomvault ARGS`` in-process, for module-scoped fixtures (no capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return Run(code, out.getvalue(), err.getvalue())


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def catalog(db: Path) -> dict[str, dict]:
    """Everything the catalog holds, keyed by identity, read with plain SQL
    (independent of dicomvault's own code). Internal row ids are left out."""
    with contextlib.closing(sqlite3.connect(db / "catalog.sqlite")) as conn:
        q = conn.execute
        return {
            "patients": {r[0]: r for r in q(
                "SELECT key, patient_id, issuer, name, birth_date, sex FROM patients")},
            "studies": {r[0]: r for r in q(
                "SELECT st.study_uid, p.key, st.date, st.time, st.study_id, st.accession, "
                "st.description FROM studies st JOIN patients p ON st.patient = p.id")},
            "series": {r[0]: r for r in q(
                "SELECT se.series_uid, st.study_uid, se.modality, se.number, se.description "
                "FROM series se JOIN studies st ON se.study = st.id")},
            "instances": {r[0]: r for r in q(
                "SELECT i.sop_uid, se.series_uid, i.sop_class_uid, i.transfer_syntax, i.number, i.size, "
                "i.sha256, i.imported_at, i.origin FROM instances i JOIN series se ON i.series = se.id")},
            "attributes": {(r[0], r[1]): (r[2], json.loads(r[3]), json.loads(r[4])) for r in q(
                "SELECT level, uid, comment, tags, fields FROM attributes")},
            "attachments": {r[0]: r for r in q(
                "SELECT attachment_id, level, uid, name, media_type, size, sha256, created_at "
                "FROM attachments")},
        }


def store_files(db: Path) -> dict[str, int]:
    """SHA-256 -> size of every file in the content store, hashed from the
    bytes on disk (whatever the files are named)."""
    out: dict[str, int] = {}
    for f in sorted((db / "store").rglob("*")):
        if f.is_file():
            data = f.read_bytes()
            out[hashlib.sha256(data).hexdigest()] = len(data)
    return out


def state(db: Path) -> dict[str, object]:
    """A fingerprint of a database directory: catalog content, the catalog
    file's bytes, and every store file with size, mtime and hash."""
    files = {}
    for f in sorted((db / "store").rglob("*")):
        if f.is_file():
            st = f.stat()
            files[str(f.relative_to(db))] = (st.st_size, st.st_mtime_ns, sha256_file(f))
    return {"catalog": catalog(db), "files": files,
            "catalog_file": sha256_file(db / "catalog.sqlite")}


def check_consistent(db: Path) -> dict[str, int]:
    """The store holds exactly the files the catalog refers to, with the
    recorded sizes: nothing missing, nothing orphaned."""
    cat = catalog(db)
    files = store_files(db)
    referenced = {r[6]: r[5] for r in cat["instances"].values()}
    referenced.update({r[6]: r[5] for r in cat["attachments"].values()})
    assert files == referenced
    return files


def instances_of(cat: dict, *, patient: str = "", study: str = "", series: str = "") -> set[str]:
    """SOP Instance UIDs of a selection, from a catalog read with plain SQL."""
    out = set()
    for uid, row in cat["instances"].items():
        se = cat["series"][row[1]]
        st = cat["studies"][se[1]]
        p = cat["patients"][st[1]]
        if patient and patient not in (p[0], p[1]):
            continue
        if study and st[0] != study:
            continue
        if series and se[0] != series:
            continue
        out.add(uid)
    return out


def owners_of(cat: dict, sops: set[str]) -> dict[str, set[str]]:
    """Patients, studies and series that contain the given instances."""
    series = {cat["instances"][u][1] for u in sops}
    studies = {cat["series"][s][1] for s in series}
    patients = {cat["studies"][s][1] for s in studies}
    return {"patient": patients, "study": studies, "series": series, "instance": set(sops)}


def subset(cat: dict, sops: set[str]) -> dict[str, dict]:
    """What a database must hold after importing exactly these instances
    (with their hierarchy, attributes and attachments)."""
    own = owners_of(cat, sops)
    return {
        "patients": {k: v for k, v in cat["patients"].items() if k in own["patient"]},
        "studies": {k: v for k, v in cat["studies"].items() if k in own["study"]},
        "series": {k: v for k, v in cat["series"].items() if k in own["series"]},
        "instances": {k: v for k, v in cat["instances"].items() if k in sops},
        "attributes": {k: v for k, v in cat["attributes"].items() if k[1] in own[k[0]]},
        "attachments": {k: v for k, v in cat["attachments"].items() if v[2] in own[v[1]]},
    }


# ---------------------------------------------------------------------- the source database


@dataclass
class Source:
    db: Path
    bkp: Path
    patient_id: str  # a PatientID with several studies
    patient_key: str
    study: str  # a study of that patient with several series
    series: str  # a series of that study with several instances
    instance: str
    other_study: str  # a study of another patient
    other_series: str
    attachments: dict[str, bytes] = field(default_factory=dict)  # attachment name -> content


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, real_dicom: list[str]) -> Source:
    """The real corpus ingested, annotated and given attachments at every
    level, and its whole-database export."""
    root = tmp_path_factory.mktemp("roundtrip")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DICOMVAULT_DB", str(root / "default-db"))
        mp.setenv("DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD", "1")
        db = root / "source-db"
        ingest = run("--db", db, "import-dicom", *real_dicom, "--json")
        assert ingest.code == 1, ingest.err  # pydicom ships broken and duplicate files on purpose
        assert ingest.json()["counts"]["instance"]["stored"] > 100
        cat = catalog(db)

        # A patient with a PatientID and several studies; its study with the
        # most series; that study's series with the most instances.
        def sops(**sel: str) -> set[str]:
            return instances_of(cat, **sel)

        all_ids = [p[1] for p in cat["patients"].values()]
        patients = [p for p in cat["patients"].values() if p[1] and all_ids.count(p[1]) == 1]
        patient = max(patients, key=lambda p: (sum(1 for st in cat["studies"].values() if st[1] == p[0]),
                                               len(sops(patient=p[0])), p[0]))
        studies = [st for st in cat["studies"].values() if st[1] == patient[0]]
        assert len(studies) >= 2
        study = max(studies, key=lambda st: (sum(1 for se in cat["series"].values() if se[1] == st[0]),
                                             st[0]))
        series_rows = [se for se in cat["series"].values() if se[1] == study[0]]
        assert len(series_rows) >= 2
        series = max(series_rows, key=lambda se: (len(sops(series=se[0])), se[0]))
        assert len(sops(series=series[0])) >= 2
        instance = sorted(sops(series=series[0]))[0]
        other = sorted(st for st in cat["studies"].values() if st[1] != patient[0])[0]
        other_series = sorted(se[0] for se in cat["series"].values() if se[1] == other[0])[0]

        src = Source(db=db, bkp=root / "whole.bkp", patient_id=patient[1], patient_key=patient[0],
                     study=study[0], series=series[0], instance=instance, other_study=other[0],
                     other_series=other_series)
        files = root / "attachments"
        files.mkdir()
        rng = random.Random(20240601)
        content = {
            "liver-voi.csv": b"roi,label,volume_ml\n1,liver,1520.5\n2,tumour,12.25\n",
            "patlak-fit.json": json.dumps({"Ki": 0.0123, "V0": 0.41, "r2": 0.998}).encode(),
            "consent.pdf": bytes(rng.getrandbits(8) for _ in range(300_000)),
            "other-voi.csv": b"roi,label\n1,lung\n",
            "other-series-notes.txt": "Bemerkung: Bewegungsartefakt \u2014 \u00bd Rahmen\n".encode(),
        }
        for name, data in content.items():
            (files / name).write_bytes(data)
        src.attachments = content
        steps = [
            ("annotate", "--patient", src.patient_id, "--comment", "cohort A \u00e9t\u00e9", "--tag", "pet",
             "--field", "cohort=A"),
            ("annotate", "--study", src.study, "--comment", "baseline", "--tag", "qc-ok", "--tag", "fdg",
             "--field", "tracer=FDG", "--field", "dose=370 MBq"),
            ("annotate", "--series", src.series, "--tag", "motion", "--field", "frames=24"),
            ("annotate", "--instance", src.instance, "--comment", "key image"),
            ("annotate", "--study", src.other_study, "--comment", "not part of the patient"),
            ("annotate", "--series", src.other_series, "--tag", "other"),
            ("attach", files / "consent.pdf", "--patient", src.patient_id),
            ("attach", files / "liver-voi.csv", "--study", src.study, "--media-type", "text/csv"),
            ("attach", files / "patlak-fit.json", "--series", src.series),
            ("attach", files / "other-voi.csv", "--study", src.other_study),
            ("attach", files / "other-series-notes.txt", "--series", src.other_series),
        ]
        for step in steps:
            res = run("--db", db, *step)
            assert res.code == 0, (step, res.err)
        export = run("--db", db, "export-db", src.bkp, "--whole", "--json")
        assert export.code == 0, export.err
    return src


@pytest.fixture(scope="module")
def source_catalog(source: Source) -> dict[str, dict]:
    return catalog(source.db)


# ---------------------------------------------------------------------- the source itself


def test_source_keeps_input_bytes_unchanged(source: Source, source_catalog: dict) -> None:
    """The store holds every ingested file byte for byte: each stored file
    hashes to the SHA-256 of the file it came from (its recorded origin)."""
    check_consistent(source.db)
    assert len(source_catalog["attributes"]) == 6
    assert len(source_catalog["attachments"]) == 5
    for uid, row in source_catalog["instances"].items():
        origin = row[8]
        assert origin.startswith("file:"), uid
        original = Path(origin[len("file:"):])
        assert sha256_file(original) == row[6], uid
        assert original.stat().st_size == row[5], uid
    by_name = {r[3]: r for r in source_catalog["attachments"].values()}
    for name, data in source.attachments.items():
        assert by_name[name][6] == hashlib.sha256(data).hexdigest()
        assert by_name[name][5] == len(data)


# ---------------------------------------------------------------------- whole database


def test_whole_database_round_trip(cli, source: Source, source_catalog: dict, tmp_path: Path) -> None:
    restored = tmp_path / "restored"
    res = cli("--db", restored, "import-db", source.bkp, "--json")
    assert res.code == 0, res.err
    report = res.json()
    n = len(source_catalog["instances"])
    assert report["counts"]["instance"] == {"stored": n}
    assert report["counts"]["attributes"] == {"stored": len(source_catalog["attributes"])}
    assert report["counts"]["attachment"] == {"stored": len(source_catalog["attachments"])}
    assert report["problems"] == []

    # 1. compare, against the database and against the .bkp itself
    for other in (restored, source.bkp):
        res = cli("--db", source.db, "compare", other, "--whole", "--json")
        assert res.code == 0, res.err
        counts = res.json()["counts"]
        assert counts["instance"] == {"unchanged": n}
        assert counts["attributes"] == {"unchanged": len(source_catalog["attributes"])}
        assert counts["attachment"] == {"unchanged": len(source_catalog["attachments"])}

    # 2. independently: catalogs row for row (records, hierarchy, transfer
    # syntax, size, import time, origin, attributes, attachments) ...
    restored_catalog = catalog(restored)
    for part in source_catalog:
        assert restored_catalog[part] == source_catalog[part], part
    # ... and the stored bytes, hashed from disk on both sides.
    assert check_consistent(restored) == check_consistent(source.db)


def test_round_trip_checks_can_fail(cli, source: Source, tmp_path: Path) -> None:
    """Negative controls: compare and the independent check both notice a
    damaged stored file and a changed attribute in the restored database."""
    restored = tmp_path / "restored"
    assert cli("--db", restored, "import-db", source.bkp).code == 0
    victim = catalog(restored)["instances"][source.instance]
    damaged = next(f for f in (restored / "store").rglob("*") if f.is_file() and sha256_file(f) == victim[6])
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.chmod(0o600)
    damaged.write_bytes(bytes(data))
    assert cli("--db", restored, "annotate", "--study", source.study, "--tag", "changed").code == 0

    res = cli("--db", source.db, "compare", restored, "--whole", "--json")
    assert res.code != 0
    problems = {(p["what"], p["item"]) for p in res.json()["problems"]}
    assert ("instance", source.instance) in problems
    assert ("attributes", f"study {source.study}") in problems
    assert len(problems) == 2
    with pytest.raises(AssertionError):
        check_consistent(restored)
    assert catalog(restored)["attributes"] != catalog(source.db)["attributes"]


def test_bkp_manifest_matches_the_database(source: Source, source_catalog: dict) -> None:
    """The .bkp holds every instance with its record, and each blob's bytes
    hash to the stored file's SHA-256."""
    reader = BkpReader(source.bkp)
    try:
        m = reader.manifest
        assert {e.record.sop_uid for e in m.instances} == set(source_catalog["instances"])
        for entry in m.instances:
            row = source_catalog["instances"][entry.record.sop_uid]
            r = entry.record
            assert (r.sop_uid, r.series_uid, r.sop_class_uid, r.transfer_syntax, r.number, r.size,
                    r.sha256, r.imported_at, r.origin) == row
            with reader.open_blob(entry.blob) as fh:
                assert hashlib.sha256(fh.read()).hexdigest() == row[6]
        assert {a.attachment_id for a in (e.record for e in m.attachments)} == \
            set(source_catalog["attachments"])
        assert {(a.level, a.uid) for a in m.attributes} == set(source_catalog["attributes"])
        assert {p.key for p in m.patients} == set(source_catalog["patients"])
        assert {s.study_uid for s in m.studies} == set(source_catalog["studies"])
        assert {s.series_uid for s in m.series} == set(source_catalog["series"])
    finally:
        reader.close()


# ---------------------------------------------------------------------- selections


SELECTIONS = ["patient-id", "patient-key", "study", "series"]


def _selection(source: Source, kind: str) -> tuple[list[str], dict[str, str]]:
    if kind == "patient-id":
        return ["--patient", source.patient_id], {"patient": source.patient_id}
    if kind == "patient-key":
        return ["--patient", source.patient_key], {"patient": source.patient_key}
    if kind == "study":
        return ["--study", source.study], {"study": source.study}
    return ["--series", source.series], {"series": source.series}


@pytest.mark.parametrize("kind", SELECTIONS)
def test_selective_import_brings_exactly_the_selection(cli, source: Source, source_catalog: dict,
                                                        tmp_path: Path, kind: str) -> None:
    args, sel = _selection(source, kind)
    wanted = instances_of(source_catalog, **sel)
    assert 1 < len(wanted) < len(source_catalog["instances"])
    restored = tmp_path / "restored"
    res = cli("--db", restored, "import-db", source.bkp, *args, "--json")
    assert res.code == 0, res.err
    expected = subset(source_catalog, wanted)
    report = res.json()
    assert report["counts"]["instance"] == {"stored": len(wanted)}
    assert report["counts"]["attributes"] == {"stored": len(expected["attributes"])}
    assert report["counts"]["attachment"] == {"stored": len(expected["attachments"])}

    got = catalog(restored)
    assert set(got["instances"]) == wanted
    for part in expected:
        assert got[part] == expected[part], part
    # The attributes and attachments of the other patient stayed behind; the
    # selected patient's own ones came along (they describe what was chosen).
    assert ("study", source.other_study) not in got["attributes"]
    assert ("patient", source.patient_key) in got["attributes"]
    names = {r[3] for r in got["attachments"].values()}
    assert "other-voi.csv" not in names and "consent.pdf" in names
    files = check_consistent(restored)
    assert set(files) == {r[6] for r in expected["instances"].values()} | \
        {r[6] for r in expected["attachments"].values()}

    res = cli("--db", source.db, "compare", restored, *args, "--json")
    assert res.code == 0, res.err
    assert res.json()["counts"]["instance"] == {"unchanged": len(wanted)}
    # and over the whole database the rest is missing, nothing is extra
    res = cli("--db", source.db, "compare", restored, "--whole", "--json")
    assert res.code != 0
    failed = [p for p in res.json()["problems"] if p["what"] == "instance"]
    assert {p["item"] for p in failed} == set(source_catalog["instances"]) - wanted
    assert all(p["reason"] == "missing in the other" for p in failed)


@pytest.mark.parametrize("kind", ["patient-id", "study", "series"])
def test_selective_export(cli, source: Source, source_catalog: dict, tmp_path: Path, kind: str) -> None:
    args, sel = _selection(source, kind)
    wanted = instances_of(source_catalog, **sel)
    expected = subset(source_catalog, wanted)
    out = tmp_path / "part.bkp"
    res = cli("--db", source.db, "export-db", out, *args, "--json")
    assert res.code == 0, res.err
    assert res.json()["counts"]["instance"] == {"stored": len(wanted)}

    reader = BkpReader(out)
    try:
        m = reader.manifest
        assert {e.record.sop_uid for e in m.instances} == wanted
        assert {p.key for p in m.patients} == set(expected["patients"])
        assert {s.study_uid for s in m.studies} == set(expected["studies"])
        assert {s.series_uid for s in m.series} == set(expected["series"])
        assert {(a.level, a.uid) for a in m.attributes} == set(expected["attributes"])
        assert {e.record.attachment_id for e in m.attachments} == set(expected["attachments"])
    finally:
        reader.close()

    restored = tmp_path / "restored"
    assert cli("--db", restored, "import-db", out).code == 0
    got = catalog(restored)
    for part in expected:
        assert got[part] == expected[part], part
    check_consistent(restored)
    assert cli("--db", source.db, "compare", out, *args).code == 0


# ---------------------------------------------------------------------- dry run, conflicts, repeats


def test_dry_run_changes_nothing_and_predicts_the_real_run(cli, source: Source, source_catalog: dict,
                                                          tmp_path: Path) -> None:
    target = tmp_path / "target"
    assert cli("--db", target, "import-db", source.bkp, "--study", source.study).code == 0
    already = instances_of(source_catalog, study=source.study)
    before = state(target)

    res = cli("--db", target, "import-db", source.bkp, "--dry-run", "--json")
    assert res.code == 0, res.err
    dry = res.json()
    n = len(source_catalog["instances"])
    assert dry["counts"]["instance"] == {"would-store": n - len(already), "unchanged": len(already)}
    assert state(target) == before
    assert not list((target / "tmp").iterdir())

    res = cli("--db", target, "import-db", source.bkp, "--json")
    assert res.code == 0, res.err
    assert res.json()["counts"]["instance"] == {"stored": n - len(already), "unchanged": len(already)}
    assert catalog(target) == source_catalog


def test_dry_run_predicts_attributes_and_attachments(cli, source: Source, tmp_path: Path) -> None:
    target = tmp_path / "target"
    assert cli("--db", target, "import-db", source.bkp).code == 0
    dry = cli("--db", target, "import-db", source.bkp, "--dry-run", "--json").json()
    real = cli("--db", target, "import-db", source.bkp, "--json").json()
    assert dry["counts"] == real["counts"]


def test_dry_run_predicts_an_attribute_conflict(cli, source: Source, tmp_path: Path) -> None:
    target = tmp_path / "target"
    assert cli("--db", target, "import-db", source.bkp).code == 0
    assert cli("--db", target, "annotate", "--study", source.study, "--comment", "changed here").code == 0
    dry = cli("--db", target, "import-db", source.bkp, "--dry-run", "--json")
    assert dry.code == 1
    assert dry.json()["counts"]["attributes"].get("conflict") == 1
    real = cli("--db", target, "import-db", source.bkp, "--json")
    assert real.json()["counts"] == dry.json()["counts"]
    over = cli("--db", target, "import-db", source.bkp, "--dry-run", "--on-conflict", "overwrite", "--json")
    assert over.json()["counts"]["attributes"].get("would-overwrite") == 1


def test_dry_run_does_not_create_a_database(cli, source: Source, tmp_path: Path) -> None:
    target = tmp_path / "not-yet"
    res = cli("--db", target, "import-db", source.bkp, "--dry-run", "--json")
    assert res.code == 0, res.err
    assert not target.exists()


@pytest.fixture
def conflicting(cli, source: Source, source_catalog: dict, tmp_path: Path) -> tuple[Path, set[str]]:
    """A database holding three instances of the source under their UIDs but
    with other bytes (one pixel byte changed in a copy of the real file)."""
    native = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
    rows = sorted((r for r in source_catalog["instances"].values() if r[3] in native and r[5] > 20_000),
                  key=lambda r: r[0])[:3]
    assert len(rows) == 3
    changed = tmp_path / "changed"
    changed.mkdir()
    for i, row in enumerate(rows):
        data = bytearray(Path(row[8][len("file:"):]).read_bytes())
        data[-200] ^= 0xFF
        (changed / f"{i}.dcm").write_bytes(bytes(data))
    target = tmp_path / "target"
    res = cli("--db", target, "import-dicom", changed, "--json")
    assert res.code == 0 and res.json()["counts"]["instance"] == {"stored": 3}, res.err
    uids = {r[0] for r in rows}
    held = catalog(target)["instances"]
    assert set(held) == uids and all(held[u][6] != source_catalog["instances"][u][6] for u in uids)
    return target, uids


def test_conflict_skip_reports_and_keeps_the_stored_copy(cli, source: Source, source_catalog: dict,
                                                         conflicting: tuple[Path, set[str]]) -> None:
    target, uids = conflicting
    held = {u: catalog(target)["instances"][u] for u in uids}
    files = store_files(target)

    dry = cli("--db", target, "import-db", source.bkp, "--dry-run", "--json")
    assert dry.code == 1
    assert {p["item"] for p in dry.json()["problems"]} == uids

    res = cli("--db", target, "import-db", source.bkp, "--on-conflict", "skip", "--json")
    assert res.code == 1, res.err  # partly done: the rest is in
    report = res.json()
    n = len(source_catalog["instances"])
    assert report["counts"]["instance"] == {"stored": n - 3, "conflict": 3}
    assert {(p["what"], p["item"], p["outcome"]) for p in report["problems"]} == \
        {("instance", u, "conflict") for u in uids}
    for u in uids:
        assert u in res.err  # one line each on stderr
    got = catalog(target)
    for u in uids:
        assert got["instances"][u] == held[u]
        assert files[held[u][6]] == held[u][5]
    assert set(got["instances"]) == set(source_catalog["instances"])
    for u in set(got["instances"]) - uids:
        assert got["instances"][u] == source_catalog["instances"][u]
    assert got["attributes"] == source_catalog["attributes"]
    assert got["attachments"] == source_catalog["attachments"]
    check_consistent(target)


def test_conflict_overwrite_replaces_the_stored_copy(cli, source: Source, source_catalog: dict,
                                                      conflicting: tuple[Path, set[str]]) -> None:
    target, uids = conflicting
    old = {catalog(target)["instances"][u][6] for u in uids}
    dry = cli("--db", target, "import-db", source.bkp, "--dry-run", "--on-conflict", "overwrite", "--json")
    assert dry.code == 0
    assert dry.json()["counts"]["instance"]["would-overwrite"] == 3

    res = cli("--db", target, "import-db", source.bkp, "--on-conflict", "overwrite", "--json")
    assert res.code == 0, res.err
    n = len(source_catalog["instances"])
    assert res.json()["counts"]["instance"] == {"stored": n - 3, "overwritten": 3}
    assert catalog(target) == source_catalog
    files = check_consistent(target)  # the replaced files are gone from the store
    assert not old & set(files)


def test_conflict_fail_changes_nothing(cli, source: Source, conflicting: tuple[Path, set[str]]) -> None:
    target, _uids = conflicting
    before = state(target)
    res = cli("--db", target, "import-db", source.bkp, "--on-conflict", "fail")
    assert res.code == 2
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dicomvault: error:"), res.err
    assert "3 instance(s)" in lines[0] and "Traceback" not in res.err
    assert state(target) == before
    assert not list((target / "tmp").iterdir())


def test_import_twice_second_time_unchanged(cli, source: Source, source_catalog: dict,
                                            tmp_path: Path) -> None:
    target = tmp_path / "target"
    assert cli("--db", target, "import-db", source.bkp).code == 0
    first = state(target)
    res = cli("--db", target, "import-db", source.bkp, "--json")
    assert res.code == 0, res.err
    counts = res.json()["counts"]
    assert counts == {"instance": {"unchanged": len(source_catalog["instances"])},
                      "attributes": {"unchanged": len(source_catalog["attributes"])},
                      "attachment": {"unchanged": len(source_catalog["attachments"])}}
    assert res.json()["bytes"] == 0
    second = state(target)
    assert second["catalog"] == first["catalog"] and second["files"] == first["files"]
    with contextlib.closing(sqlite3.connect(target / "catalog.sqlite")) as conn:
        for table in ("patients", "studies", "series", "instances", "attributes", "attachments"):
            (rows,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            assert rows == len(source_catalog[table]), table


def test_restored_database_exports_an_equivalent_bkp(cli, source: Source, tmp_path: Path) -> None:
    """Backup of the restore compares equal to the source: the round trip is
    stable, not just one-way."""
    restored = tmp_path / "restored"
    assert cli("--db", restored, "import-db", source.bkp).code == 0
    again = tmp_path / "again.bkp"
    assert cli("--db", restored, "export-db", again, "--whole").code == 0
    assert cli("--db", source.db, "compare", again, "--whole").code == 0
    final = tmp_path / "final"
    assert cli("--db", final, "import-db", again).code == 0
    assert catalog(final) == catalog(source.db)
    shutil.rmtree(final)
