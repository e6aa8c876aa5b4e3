"""export-dicom: layout and name policy, DICOMDIR media checked by real peers
(dicom3tools' dciodvfy, DCMTK's dcmdump, pydicom's FileSet), zips checked by
``unzip -t`` and zipfile, on real files and on copies with awkward names,
character sets and UIDs generated here (nothing is committed)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import unicodedata
import zipfile
from pathlib import Path

import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.filebase import DicomFileLike
from pydicom.fileset import FileSet, is_conformant_file_id
from pydicom.uid import generate_uid

from dicomvault.plugins.dicom_export import naming

REAL = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "image_dfl.dcm",
        "liver_expb_1frame.dcm", "SC_rgb_small_odd_big_endian.dcm", "rtplan.dcm"]
BAD_CHARS = set('/\\:*?"<>|')


def _variant(src: Path, out: Path, key: str, **attrs: object) -> None:
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = attrs.pop("StudyInstanceUID", generate_uid(entropy_srcs=[key, "study"]))
    ds.SeriesInstanceUID = attrs.pop("SeriesInstanceUID", generate_uid(entropy_srcs=[key, "series"]))
    ds.SOPInstanceUID = attrs.pop("SOPInstanceUID", generate_uid(entropy_srcs=[key, "sop"]))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(out, enforce_file_format=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, pydicom_files: Path) -> Path:
    """Real files, plus CT_small copies with names in many character sets, two
    patients sharing a name, empty PatientIDs, hostile UIDs and descriptions."""
    d = tmp_path_factory.mktemp("inputs")
    for name in REAL:
        shutil.copy(pydicom_files / name, d / name)
    ct = pydicom_files / "CT_small.dcm"
    # MR_small_implicit.dcm shares MR_small.dcm's SOP Instance UID: a copy with its own UIDs
    _variant(pydicom_files / "MR_small_implicit.dcm", d / "mr_implicit.dcm", "mrimplicit")
    _variant(ct, d / "latin1.dcm", "latin1", SpecificCharacterSet="ISO_IR 100",
             PatientName="Müller^Jürgen", PatientID="LAT1")
    _variant(ct, d / "utf8.dcm", "utf8", SpecificCharacterSet="ISO_IR 192",
             PatientName="Łukasz^Żółć", PatientID="UTF8", StudyDescription="Ünïcödé 検査")
    _variant(ct, d / "cyr.dcm", "cyr", SpecificCharacterSet="ISO_IR 144",
             PatientName="Иванов^Иван", PatientID="CYR")
    _variant(ct, d / "jp.dcm", "jp", SpecificCharacterSet=["", "ISO 2022 IR 87"],
             PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう", PatientID="JP")
    # labelled Latin-1, but the bytes are UTF-8
    _variant(ct, d / "mislabel.dcm", "mislabel", SpecificCharacterSet="ISO_IR 192",
             PatientName="Šťastný^Tomáš", PatientID="MISL")
    raw = (d / "mislabel.dcm").read_bytes()
    (d / "mislabel.dcm").write_bytes(raw.replace(b"ISO_IR 192", b"ISO_IR 100"))
    for i, pid in enumerate(("DOE1", "DOE2")):  # two patients, one name
        _variant(ct, d / f"doe{i}.dcm", f"doe{i}", PatientName="Doe^John", PatientID=pid)
    for i, birth in enumerate(("19700101", "19800101")):  # same name, no ID, two people
        _variant(ct, d / f"noid{i}.dcm", f"noid{i}", PatientName="Roe^Jane", PatientID="",
                 PatientBirthDate=birth)
    _variant(ct, d / "evil.dcm", "evil", PatientID="EVIL", StudyInstanceUID="../../../../../../tmp/evil",
             SeriesInstanceUID="..\\..\\..\\evil", SOPInstanceUID="/../../evil.dcm")
    _variant(ct, d / "reserved.dcm", "reserved", PatientID="CON", PatientName="COM1",
             StudyDescription='a/b\\c:d*e?f"g<h>i|j. ', SeriesDescription="..", SeriesNumber=None)
    return d


@pytest.fixture(scope="module")
def db(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dicomvault.cli.main import main

    path = tmp_path_factory.mktemp("db") / "db"
    assert main(["-q", "--db", str(path), "import-dicom", str(inputs)]) == 0
    return path


def _fileset(path: Path) -> FileSet:
    """pydicom's FileSet, re-reading a DICOMDIR (without its idle staging folder)."""
    fs = FileSet(path)
    fs._stage["t"].cleanup()
    return fs


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _input_by_sha(inputs: Path) -> dict[str, Path]:
    return {_sha(p): p for p in inputs.iterdir()}


def _report(root: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((root / "export-report.json").read_text("utf-8"))  # type: ignore[no-any-return]


def _files_outside(base: Path, keep: set[Path]) -> set[Path]:
    return {p for p in base.rglob("*") if not any(k == p or k in p.parents for k in keep)}


def _valid_component(c: str) -> None:
    assert c and c == unicodedata.normalize("NFC", c)
    assert not (set(c) & BAD_CHARS), c
    assert not any(unicodedata.category(ch) == "Cc" for ch in c), c
    assert c[-1] not in ". " and c not in (".", ".."), c
    assert c.split(".")[0].upper() not in naming.RESERVED, c
    assert len(c) <= naming.COMPONENT_MAX and len(c.encode()) <= 255


# ---------------------------------------------------------------- the name policy
@pytest.mark.parametrize(("value", "expected"), [
    ("CON", "_CON"), ("com1.dcm", "_com1.dcm"), ("a/b\\c:d*e", "a_b_c_d_e"), ("name. ", "name"),
    ("", "fallback"), ("..", "fallback"), ("x\x00y\x1fz", "x_y_z"), ("Ünï", "Ünï"),
])
def test_sanitize_examples(value: str, expected: str) -> None:
    assert naming.sanitize(value, "fallback") == expected


@given(st.text(max_size=300))
def test_sanitize_always_valid(value: str) -> None:
    _valid_component(naming.sanitize(value, "x"))
    fid = naming.file_id(value, "X")
    assert 1 <= len(fid) <= 8 and all(c.isascii() and (c.isupper() or c.isdigit() or c == "_") for c in fid)


def test_allocator_separates_owners_deterministically() -> None:
    a, b = naming.NameAllocator(), naming.NameAllocator()
    names_a = [a.allocate("", "Doe", o) for o in ("p1", "p2", "p1", "p3")]
    names_b = [b.allocate("", "doe", o) for o in ("p1", "p2", "p3")]
    assert names_a[0] == "Doe" and names_a[2] == "Doe"
    assert len({n.casefold() for n in names_a[:2] + names_a[3:]}) == 3
    assert names_a[1][3:] == names_b[1][3:]  # the suffix depends on the owner, not on luck


# ---------------------------------------------------------------- folder export
def test_export_default_layout(cli, db: Path, inputs: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    before = _files_outside(tmp_path, {out})
    r = cli("--db", db, "--json", "export-dicom", out, "--whole")
    assert r.code == 0, r.err
    rep = _report(out)
    assert len(rep["instances"]) == len(list(inputs.iterdir())) == r.json()["counts"]["instance"]["stored"]
    by_sha = _input_by_sha(inputs)
    for entry in rep["instances"].values():
        p = out / entry["path"]
        assert p.is_file() and _sha(p) == entry["sha256"]
        assert entry["sha256"] in by_sha  # byte-identical to an input (nothing converted here)
        assert os.path.realpath(p).startswith(str(out.resolve()) + os.sep)
        for c in entry["path"].split("/"):
            _valid_component(c)
    top = {p.name for p in out.iterdir()}
    assert {"Müller Jürgen_LAT1", "Łukasz Żółć_UTF8", "Иванов Иван_CYR",
            "Yamada Tarou=山田 太郎=やまだ たろう_JP", "Doe John_DOE1", "Doe John_DOE2"} <= top
    roe = sorted(n for n in top if n.startswith("Roe Jane"))
    assert len(roe) == 2, top  # same name, no PatientID, two people: two folders
    assert "_CON_COM1" not in top and any(n.startswith("COM1_CON") for n in top)
    assert _files_outside(tmp_path, {out}) == before  # nothing written outside OUTDIR
    assert not any(p.name.startswith(".dicomvault-export") for p in out.iterdir())
    # the same export again, elsewhere: the same names
    r2 = cli("--db", db, "-q", "export-dicom", tmp_path / "again", "--whole")
    assert r2.code == 0
    assert {k: v["path"] for k, v in _report(tmp_path / "again")["instances"].items()} == \
           {k: v["path"] for k, v in rep["instances"].items()}


def test_hostile_uids_in_template_stay_inside(cli, db: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "a" / "out"
    out.parent.mkdir()
    before = _files_outside(tmp_path, {out})
    r = cli("--db", db, "-q", "export-dicom", out, "--patient", "EVIL",
            "--layout", "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}")
    assert r.code == 0, r.err
    (path,) = [e["path"] for e in _report(out)["instances"].values()]
    assert len(path.split("/")) == 3 and ".." not in path.split("/")
    assert (out / path).is_file()
    assert _files_outside(tmp_path, {out}) == before


def test_same_name_never_shares_a_folder(cli, db: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    r = cli("--db", db, "-q", "export-dicom", out, "--patient", "DOE1", "--patient", "DOE2",
            "--layout", "{PatientName}/{InstanceNumber}.dcm")
    assert r.code == 0, r.err
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(folders) == 2 and folders[0] == "Doe John" and folders[1].startswith("Doe John_")


def test_symlink_in_outdir_is_not_followed(cli, db: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "Doe John_DOE1").symlink_to(elsewhere)
    r = cli("--db", db, "--json", "export-dicom", out, "--patient", "DOE1")
    assert r.code != 0
    assert "outside the output folder" in r.out
    assert list(elsewhere.iterdir()) == []


def test_on_existing(cli, db: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    args = ("--db", db, "--json", "export-dicom", out, "--patient", "LAT1")
    assert cli(*args).code == 0
    (path,) = [e["path"] for e in _report(out)["instances"].values()]
    r = cli(*args)
    assert r.code == 0 and r.json()["counts"]["instance"] == {"unchanged": 1}
    (out / path).write_bytes(b"changed")
    r = cli(*args)  # skip: reported, left untouched
    assert r.code == 2 and r.json()["problems"][0]["outcome"] == "conflict"  # nothing else done: failed
    assert (out / path).read_bytes() == b"changed"
    # the default layout puts the patient's name and ID in the path: messages name the instance
    assert "Müller" in path and "LAT1" in path
    said = r.err + json.dumps(r.json()["problems"], ensure_ascii=False)
    assert not any(s in said for s in ("Müller", "Jürgen", "LAT1")), said
    r = cli(*args, "--on-existing", "fail")
    assert r.code == 2 and "nothing was written" in r.err
    assert not any(s in r.err for s in ("Müller", "Jürgen", "LAT1")), r.err
    r = cli(*args, "--on-existing", "rename")
    assert r.code == 0 and (out / path).read_bytes() == b"changed"
    renamed = _report(out)["instances"]
    (newpath,) = [e["path"] for e in renamed.values()]
    assert newpath != path and (out / newpath).stat().st_size > 100
    r = cli(*args, "--on-existing", "overwrite")
    assert r.code == 0 and r.json()["counts"]["instance"] == {"overwritten": 1}
    assert (out / path).read_bytes() == (out / newpath).read_bytes()


def test_from_bkp_and_transfer(cli, db: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bkp = tmp_path / "x.bkp"
    assert cli("--db", db, "-q", "export-db", bkp, "--patient", "CYR", "--patient", "JP").code == 0
    r = cli("-q", "export-dicom", tmp_path / "fromfile", "--from", bkp, "--whole")
    assert r.code == 0, r.err
    r = cli("--db", db, "-q", "export-dicom", tmp_path / "fromdb", "--patient", "CYR", "--patient", "JP")
    assert r.code == 0, r.err
    paths = [sorted(e["path"] for e in _report(tmp_path / d)["instances"].values())
             for d in ("fromfile", "fromdb")]
    assert paths[0] == paths[1] and len(paths[0]) == 2
    r = cli("--db", db, "-q", "transfer", "--from", bkp, "--whole", "--to",
            f"dicom-folder:{tmp_path / 'viatransfer'}?dicomdir=1")
    assert r.code == 0, r.err
    assert len(_fileset(tmp_path / "viatransfer" / "DICOMDIR")) == 2


# ---------------------------------------------------------------- DICOMDIR media
def _dciodvfy_errors(path: Path) -> list[str]:
    res = subprocess.run(["dciodvfy", str(path)], capture_output=True, check=False)
    text = (res.stdout + res.stderr).decode("latin-1")
    return [line for line in text.splitlines() if line.startswith("Error")]


def _words(value: bytes, little: bool, size: int) -> list[int]:
    code = {2: "H", 4: "I", 8: "Q"}[size]
    return list(struct.unpack(f"{'<' if little else '>'}{len(value) // size}{code}", value))


def _same_values(a: pydicom.Dataset, b: pydicom.Dataset, big_endian_source: bool) -> None:
    assert set(a.keys()) == set(b.keys())
    for elem in a:
        other = b[elem.tag]
        if elem.VR == "SQ":
            assert len(elem.value) == len(other.value)
            for x, y in zip(elem.value, other.value, strict=True):
                _same_values(x, y, big_endian_source)
        elif big_endian_source and elem.VR in ("OW", "OF", "OL", "OD", "OV"):
            size = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}[elem.VR]
            assert _words(elem.value, False, size) == _words(other.value, True, size), elem.tag
        else:
            assert elem.value == other.value, elem.tag


def test_dicomdir_media(cli, db: Path, inputs: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "media"
    before = _files_outside(tmp_path, {out})
    r = cli("--db", db, "--json", "export-dicom", out, "--whole", "--dicomdir",
            "--fileset-id", "Ünïcode set/with:junk_and_more")
    assert r.code == 1, r.err  # the instance with hostile UIDs is refused for media, named
    result = r.json()
    (problem,) = result["problems"]
    assert problem["outcome"] == "rejected" and "not a valid UID" in problem["reason"]
    assert any("PatientID" in w for w in result["warnings"])  # filled by rule, said so
    assert not any("Roe" in w or "Doe" in w for w in result["warnings"] + [r.err])
    dicomdir = out / "DICOMDIR"
    assert _dciodvfy_errors(dicomdir) == []
    assert subprocess.run(["dcmdump", "-q", str(dicomdir)], capture_output=True, check=False).returncode == 0
    rep = _report(out)
    fs = _fileset(dicomdir)
    assert fs.ID == "UNICODE SET_WITH"
    assert {i.SOPInstanceUID for i in fs} == set(rep["instances"])
    assert len(fs) == len(list(inputs.iterdir())) - 1
    for inst in fs:
        assert is_conformant_file_id(Path(inst.FileID))
        assert Path(inst.path).is_file()
    by_sha = _input_by_sha(inputs)
    converted = 0
    for entry in rep["instances"].values():
        exported = out / entry["path"]
        src = by_sha[entry["source_sha256"]]
        if entry["converted_from"] is None:
            assert _sha(exported) == entry["source_sha256"]  # byte-identical
            continue
        converted += 1
        a, b = pydicom.dcmread(src), pydicom.dcmread(exported)
        assert b.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        _same_values(a, b, a.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.2")
    assert converted == 5  # implicit x2 (rtplan, MR_small_implicit), big endian x2, deflated x1
    # records carry the character set, and the names decode
    cyr = fs.find(PatientID="CYR")[0]
    rec = cyr.node.parent.parent.parent._record
    assert rec.SpecificCharacterSet == "ISO_IR 144" and str(rec.PatientName) == "Иванов^Иван"
    jp = fs.find(PatientID="JP")[0].node.parent.parent.parent._record
    assert str(jp.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert _files_outside(tmp_path, {out}) == before


def test_dicomdir_readable_layout_is_made_conformant(cli, db: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "media"
    r = cli("--db", db, "-q", "export-dicom", out, "--patient", "CYR", "--patient", "LAT1",
            "--patient", "DOE1", "--patient", "DOE2", "--dicomdir",
            "--layout", "{PatientName}/{StudyDescription}/{Modality}/{InstanceNumber}.dcm")
    assert r.code == 0, r.err
    assert _dciodvfy_errors(out / "DICOMDIR") == []
    fs = _fileset(out / "DICOMDIR")
    assert len(fs) == 4
    ids = sorted(i.FileID for i in fs)
    assert all(is_conformant_file_id(Path(i)) for i in ids)
    assert len({Path(i).parts[0] for i in ids}) == 4  # four patients, four folders, even DOE JOHN twice


def test_dicomdir_series_encoded_as_pydicom_would(cli, pydicom_files: Path,  # type: ignore[no-untyped-def]
                                                  tmp_path: Path) -> None:
    """Series of many images (their later IMAGE records are made from the
    source's records and encoded directly): the DICOMDIR is exactly what
    pydicom's own writer makes of the same records, and valid."""
    db, out = tmp_path / "db", tmp_path / "media"
    src = pydicom_files / "dicomdirtests"
    assert cli("--db", db, "-q", "import-dicom", src / "98892003", src / "77654033",
               src / "TINY_ALPHA" / "PT000000").code == 0
    r = cli("--db", db, "--json", "export-dicom", out, "--whole", "--dicomdir")
    assert r.code == 0, r.err
    dicomdir = out / "DICOMDIR"
    assert _dciodvfy_errors(dicomdir) == []
    fs = _fileset(dicomdir)
    stored = r.json()["counts"]["instance"]["stored"]
    assert len(fs) == stored > 50
    for inst in fs:
        ds = pydicom.dcmread(inst.path, stop_before_pixels=True)
        assert ds.SOPInstanceUID == inst.ReferencedSOPInstanceUIDInFile
        assert str(inst.InstanceNumber) == str(ds.InstanceNumber)
    again = io.BytesIO()
    fs._write_dicomdir(DicomFileLike(again))
    assert again.getvalue() == dicomdir.read_bytes()


def test_dicomdir_raw_data_set_becomes_part10(cli, pydicom_files: Path,  # type: ignore[no-untyped-def]
                                               tmp_path: Path) -> None:
    """A data set stored without preamble and file meta goes on media as a
    Part 10 file (same values), in a folder and in a zip; without --dicomdir
    it is exported as stored."""
    raw = pydicom_files / "ExplVR_LitEndNoMeta.dcm"
    db = tmp_path / "db"
    assert cli("--db", db, "-q", "import-dicom", raw).code == 0
    for zipped in (False, True):
        out = tmp_path / f"media{int(zipped)}"
        zip_option = ["--zip"] if zipped else []
        r = cli("--db", db, "-q", "export-dicom", out, "--whole", "--dicomdir", *zip_option)
        assert r.code == 0, r.err
        if zipped:
            with zipfile.ZipFile(out.with_suffix(".zip")) as zf:
                zf.extractall(out)
        (entry,) = _report(out)["instances"].values()
        assert entry["converted_from"] == "1.2.840.10008.1.2.1" and entry["source_sha256"] == _sha(raw)
        exported = out / entry["path"]
        assert exported.read_bytes()[128:132] == b"DICM" and _sha(exported) == entry["sha256"]
        a, b = pydicom.dcmread(raw, force=True), pydicom.dcmread(exported)
        assert b.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        _same_values(a, b, False)
        assert _dciodvfy_errors(out / "DICOMDIR") == []
    plain = tmp_path / "plain"
    assert cli("--db", db, "-q", "export-dicom", plain, "--whole").code == 0
    (entry,) = _report(plain)["instances"].values()
    assert _sha(plain / entry["path"]) == _sha(raw)


# ---------------------------------------------------------------- zip
def test_zip_with_dicomdir(cli, db: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = cli("--db", db, "--json", "export-dicom", tmp_path / "media", "--zip", "--dicomdir",
            "--patient", "CYR", "--patient", "LAT1", "--patient", "1CT1", "--patient", "4MR1")
    assert r.code == 0, r.err
    z = tmp_path / "media.zip"
    assert subprocess.run(["unzip", "-tq", str(z)], capture_output=True, check=False).returncode == 0
    x = tmp_path / "x"
    with zipfile.ZipFile(z) as zf:
        assert zf.testzip() is None
        names = zf.namelist()
        assert "DICOMDIR" in names and "export-report.json" in names
        zf.extractall(x)
    assert _dciodvfy_errors(x / "DICOMDIR") == []
    fs = _fileset(x / "DICOMDIR")
    assert len(fs) == 5 and all(Path(i.path).is_file() for i in fs)


def test_zip_non_ascii_names(cli, db: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    z = tmp_path / "named.zip"
    r = cli("--db", db, "-q", "export-dicom", z, "--zip", "--patient", "CYR", "--patient", "JP",
            "--patient", "UTF8")
    assert r.code == 0, r.err
    res = subprocess.run(["unzip", "-t", str(z)], capture_output=True, check=False)
    assert res.returncode == 0, res.stdout
    with zipfile.ZipFile(z) as zf:
        infos = [i for i in zf.infolist() if i.filename.endswith(".dcm")]
        tops = {i.filename.split("/")[0] for i in infos}
        assert tops == {"Иванов Иван_CYR", "Yamada Tarou=山田 太郎=やまだ たろう_JP", "Łukasz Żółć_UTF8"}
        assert all(i.flag_bits & 0x800 for i in infos)  # the UTF-8 flag
        report = json.loads(zf.read("export-report.json"))
        for sop, entry in report["instances"].items():
            data = zf.read(entry["path"])
            assert hashlib.sha256(data).hexdigest() == entry["sha256"] == entry["source_sha256"], sop
    assert not (tmp_path / "named.zip.part").exists()
