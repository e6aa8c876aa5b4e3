"""``import-dicom``: the real DICOM shipped in pydicom and pydicom-data goes in
byte for byte; broken input is named, one line each, and never stored.

Every expectation is computed from the input files themselves (pydicom reads
their UIDs, hashlib their SHA-256); nothing about the corpus is hard-coded
except the names of a few files the tests derive broken copies from.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import data_element_generator

from dicomvault.engine import Item, Selection
from dicomvault.plugins.embedded.database import EmbeddedDatabase

PIXEL_DATA = 0x7FE00010
SERIES_UID = 0x0020000E
ROWS = 0x00280010


# ----------------------------------------------------------------- helpers
def sha256_file(path: str | os.PathLike[str]) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def sop_uid_of(path: str | os.PathLike[str]) -> str | None:
    """The SOP Instance UID pydicom reads from a file (data set, else file meta)."""
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        uid = ds.get("SOPInstanceUID") or ds.get("file_meta", pydicom.Dataset()).get(
            "MediaStorageSOPInstanceUID")
    except Exception:
        return None
    return str(uid).strip("\0 ") if uid else None


def uids_of(path: str | os.PathLike[str]) -> tuple[str, str, str] | None:
    """(SOP, Study, Series) Instance UIDs if pydicom finds all three."""
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        found = tuple(str(ds.get(k) or "").strip("\0 ")
                      for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"))
    except Exception:
        return None
    return found if all(found) else None  # type: ignore[return-value]


def walk_files(folders: list[str]) -> Iterator[str]:
    for top in folders:
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                yield os.path.join(dirpath, name)


def stored_instances(cli, db: Path) -> dict[str, dict[str, object]]:  # type: ignore[no-untyped-def]
    """SOP UID -> {size, sha256, transfer_syntax} from ``ls --level instance --whole --json``."""
    result = cli("--db", db, "ls", "--level", "instance", "--whole", "--json")
    assert result.code == 0, result.err
    out: dict[str, dict[str, object]] = {}
    uids: list[str] = []
    for patient in result.json():
        for study in patient["children"]:
            for series in study["children"]:
                for inst in series["children"]:
                    assert inst["level"] == "instance"
                    uids.append(inst["uid"])
                    out[inst["uid"]] = {"size": inst["size"], "sha256": inst["label"]["sha256"],
                                        "transfer_syntax": inst["label"]["transfer_syntax"]}
    assert len(uids) == len(out), "an instance is listed more than once"
    return out


def stored_bytes(db: Path) -> dict[str, bytes]:
    """SOP UID -> the stored bytes, read back through the database's source API."""
    database = EmbeddedDatabase(db, create=False)
    source = database.source()
    try:
        out = {}
        for it in source.instances(Selection(whole=True)):
            assert isinstance(it, Item)
            with it.open() as fh:
                out[it.instance.sop_uid] = fh.read()
        return out
    finally:
        source.close()
        database.close()


def store_files(db: Path) -> dict[str, Path]:
    """Every file in the content store, by name."""
    return {p.name: p for p in (db / "store").rglob("*") if p.is_file()}


def problem_lines(err: str, path: str | os.PathLike[str]) -> list[str]:
    """stderr lines that name ``path`` (followed by ':' so that DICOMDIR does not
    match DICOMDIR-bigEnd)."""
    needle = f"{path}:"
    return [line for line in err.splitlines() if needle in line]


def assert_one_reason_line(err: str, path: str | os.PathLike[str]) -> str:
    lines = problem_lines(err, path)
    assert len(lines) == 1, f"expected one line naming {path}, got {lines}"
    reason = lines[0].split(f"{path}:", 1)[1].strip()
    assert reason, f"no reason given for {path}: {lines[0]!r}"
    return reason


def run_dv(*args: str | os.PathLike[str], env_db: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DICOMVAULT_DB=str(env_db), DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD="1")
    return subprocess.run([sys.executable, "-m", "dicomvault", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def elements(path: Path) -> tuple[list[tuple[int, int, int, int]], bool]:
    """Top-level elements of a Part 10 file's data set as (tag, value offset,
    declared length, bytes read), and whether the data set is implicit VR."""
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    ts = meta.TransferSyntaxUID
    start = 132 + 12 + int(meta.FileMetaInformationGroupLength)
    with open(path, "rb") as fh:
        fh.seek(start)
        out = [(int(e.tag), e.value_tell, e.length, len(e.value or b""))
               for e in data_element_generator(fh, ts.is_implicit_VR, ts.is_little_endian)
               if hasattr(e, "value_tell")]
    return out, ts.is_implicit_VR


def cut_point(path: Path, where: str) -> int:
    """A byte offset strictly inside one data element of ``path``."""
    elems, implicit = elements(path)
    after_uids = [e for e in elems if SERIES_UID < e[0] < PIXEL_DATA and 4 <= e[2] < 1 << 31]
    if where == "header-value":  # inside the value of the first element after the Series UID
        _tag, pos, length, _n = after_uids[0]
        return pos + length // 2
    if where == "header-element-tag":  # inside the tag/VR/length bytes of that element
        _tag, pos, _length, _n = after_uids[0]
        return pos - 3
    if where == "rows-value":
        _tag, pos, _length, _n = next(e for e in elems if e[0] == ROWS)
        return pos + 1
    if where == "pixel-data":  # half way through the pixel data (native or encapsulated)
        _tag, pos, length, n = next(e for e in elems if e[0] == PIXEL_DATA)
        return pos + (n if length == 0xFFFFFFFF else length) // 2
    if where == "pixel-element-tag":
        _tag, pos, _length, _n = next(e for e in elems if e[0] == PIXEL_DATA)
        return pos - (4 if implicit else 6)
    raise AssertionError(where)


def strip_meta(src: Path, dst: Path) -> str:
    """Write the data set of a Part 10 file without preamble and file meta (a
    raw data set, byte for byte what followed the meta); return its transfer syntax."""
    meta = pydicom.dcmread(src, stop_before_pixels=True).file_meta
    start = 132 + 12 + int(meta.FileMetaInformationGroupLength)
    dst.write_bytes(src.read_bytes()[start:])
    return str(meta.TransferSyntaxUID)


# ----------------------------------------------------------------- the real corpus
@pytest.fixture(scope="module")
def corpus(real_dicom: list[str], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The whole real corpus ingested once (as a user would: a subprocess)."""
    tmp = tmp_path_factory.mktemp("corpus")
    db = tmp / "db"
    proc = run_dv("--db", db, "import-dicom", *real_dicom, "--json", env_db=tmp / "unused")
    assert proc.stdout, proc.stderr
    files = sorted(walk_files(real_dicom))
    by_uid: dict[str, dict[str, str]] = {}  # uid -> {sha256: path}
    for f in files:
        uid = sop_uid_of(f)
        if uid:
            by_uid.setdefault(uid, {})[sha256_file(f)] = f
    return {"db": db, "proc": proc, "report": json.loads(proc.stdout), "files": files, "by_uid": by_uid}


def test_corpus_ingest_exit_code_and_no_traceback(corpus) -> None:  # type: ignore[no-untyped-def]
    proc, report = corpus["proc"], corpus["report"]
    assert "Traceback" not in proc.stderr
    stored = report["counts"]["instance"].get("stored", 0)
    assert stored > 100, report["counts"]
    assert report["problems"], "pydicom ships broken files: they must be reported"
    assert proc.returncode == 1, "some good, some bad: partly done"
    assert "failed" not in report["counts"]["instance"], report["problems"]


def test_corpus_every_file_gets_exactly_one_outcome(corpus) -> None:  # type: ignore[no-untyped-def]
    counts = corpus["report"]["counts"]
    total = sum(n for per in counts.values() for n in per.values())
    assert total == len(corpus["files"]), counts


def test_corpus_each_instance_stored_once_with_a_source_files_sha(cli, corpus) -> None:  # type: ignore[no-untyped-def]
    stored = stored_instances(cli, corpus["db"])
    assert len(stored) == corpus["report"]["counts"]["instance"]["stored"]
    for uid, rec in stored.items():
        sources = corpus["by_uid"].get(uid)
        assert sources, f"{uid} is stored but no input file has that SOP Instance UID"
        assert rec["sha256"] in sources, f"{uid}: stored SHA-256 is not that of any input file"
        assert rec["size"] == os.path.getsize(sources[rec["sha256"]])


def test_corpus_nothing_lost_nothing_bad_stored(cli, corpus) -> None:  # type: ignore[no-untyped-def]
    """A file is either named on stderr with a reason, or its UID is stored
    (its own bytes, or a conflict that the report names)."""
    err = corpus["proc"].stderr
    stored = stored_instances(cli, corpus["db"])
    stored_shas = {r["sha256"] for r in stored.values()}
    conflicts = {p["item"] for p in corpus["report"]["problems"] if p["outcome"] == "conflict"}
    named = named_conflicts = 0
    for f in corpus["files"]:
        if problem_lines(err, f):
            assert_one_reason_line(err, f)
            uid = sop_uid_of(f)
            if uid in conflicts and ": conflict (" in problem_lines(err, f)[0]:
                # A conflict line names the instance and the file that conflicts.
                assert stored[uid]["sha256"] != sha256_file(f), f"{f} is named a conflict, yet it is stored"
                named_conflicts += 1
                continue
            assert sha256_file(f) not in stored_shas, f"{f} was rejected, yet its bytes are stored"
            named += 1
            continue
        uid = sop_uid_of(f)
        assert uid in stored, f"{f} was neither stored nor reported"
        assert stored[uid]["sha256"] == sha256_file(f), f"{f}: other bytes under {uid}, and not named"
    files = corpus["report"]["counts"]["file"]
    assert named == files.get("rejected", 0) + files.get("ignored", 0)
    assert named_conflicts == corpus["report"]["counts"]["instance"].get("conflict", 0)


def test_corpus_known_good_files_are_stored(cli, corpus, pydicom_files: Path) -> None:  # type: ignore[no-untyped-def]
    """Files of every encoding that pydicom reads whole, with all three UIDs."""
    stored = stored_instances(cli, corpus["db"])
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm",
                 "JPEG2000.dcm", "MR_small_RLE.dcm", "ExplVR_BigEndNoMeta.dcm", "ExplVR_LitEndNoMeta.dcm"):
        path = pydicom_files / name
        ids = uids_of(path)
        assert ids is not None, name
        assert ids[0] in stored, f"{name}: a valid instance was not stored"


def test_corpus_store_keeps_bytes_unchanged(cli, corpus) -> None:  # type: ignore[no-untyped-def]
    stored = stored_instances(cli, corpus["db"])
    read_back = stored_bytes(corpus["db"])
    assert set(read_back) == set(stored)
    for uid, data in read_back.items():
        assert hashlib.sha256(data).hexdigest() == stored[uid]["sha256"]
        source = corpus["by_uid"][uid][stored[uid]["sha256"]]
        assert data == Path(source).read_bytes(), f"{uid}: stored bytes differ from {source}"


def test_corpus_store_names_come_from_content_only(cli, corpus) -> None:  # type: ignore[no-untyped-def]
    db = corpus["db"]
    stored = stored_instances(cli, db)
    names = store_files(db)
    assert set(names) == {r["sha256"] for r in stored.values()}, "store files and catalog disagree"
    basenames = {os.path.basename(f) for f in corpus["files"]}
    for path in db.rglob("*"):
        rel = str(path.relative_to(db))
        assert not any(uid in rel for uid in stored), f"a UID appears in the store path {rel}"
        assert path.name not in basenames, f"an input file name appears in the database: {rel}"


# ----------------------------------------------------------------- recognised by content
def test_recognised_by_content_not_extension(cli, tmp_path: Path, pydicom_files: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(pydicom_files / "CT_small.dcm", src / "IMAGE0001")
    shutil.copy(pydicom_files / "MR_small.dcm", src / "notes.txt")
    shutil.copy(pydicom_files / "rtplan.dcm", src / "plan.dat")
    result = cli("--db", tmp_path / "db", "import-dicom", src, "--json")
    assert result.code == 0, result.err
    stored = stored_instances(cli, tmp_path / "db")
    assert set(stored) == {sop_uid_of(p) for p in src.iterdir()}
    for p in src.iterdir():
        assert stored[sop_uid_of(p)]["sha256"] == sha256_file(p)  # type: ignore[index]


@pytest.mark.parametrize("name", ["ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm"])
def test_shipped_raw_datasets_without_meta(cli, tmp_path: Path, pydicom_files: Path, name: str) -> None:
    path = pydicom_files / name
    ids = uids_of(path)
    assert ids is not None
    implicit, little = pydicom.dcmread(path, force=True).original_encoding
    expected_ts = ("1.2.840.10008.1.2" if implicit else
                   "1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2")
    result = cli("--db", tmp_path / "db", "import-dicom", path)
    assert result.code == 0, result.err
    stored = stored_instances(cli, tmp_path / "db")
    assert stored == {ids[0]: {"size": path.stat().st_size, "sha256": sha256_file(path),
                               "transfer_syntax": expected_ts}}
    assert stored_bytes(tmp_path / "db")[ids[0]] == path.read_bytes()


def test_no_meta_dcm_is_ingested_if_and_only_if_it_has_the_uids(cli, tmp_path: Path,
                                                                 pydicom_files: Path) -> None:
    """pydicom's no_meta.dcm is CT_small.dcm's data set with the meta cut off one
    byte short: what pydicom can read of it decides whether it is an instance."""
    path = pydicom_files / "no_meta.dcm"
    result = cli("--db", tmp_path / "db", "import-dicom", path)
    assert "Traceback" not in result.err
    stored = stored_instances(cli, tmp_path / "db")
    ids = uids_of(path)
    if ids is None:
        assert result.code == 2
        assert_one_reason_line(result.err, path)
        assert stored == {}
    else:
        assert result.code == 0, result.err
        assert stored[ids[0]]["sha256"] == sha256_file(path)


@pytest.mark.parametrize("name", ["CT_small.dcm", "rtplan.dcm", "MR_small_bigendian.dcm"])
def test_raw_dataset_cut_from_a_real_file(cli, tmp_path: Path, pydicom_files: Path, name: str) -> None:
    """Explicit and implicit VR little endian, big endian: the same data set
    without preamble and meta is still recognised, with its encoding."""
    raw = tmp_path / "raw"
    ts = strip_meta(pydicom_files / name, raw)
    result = cli("--db", tmp_path / "db", "import-dicom", raw)
    assert result.code == 0, result.err
    stored = stored_instances(cli, tmp_path / "db")
    uid = sop_uid_of(pydicom_files / name)
    assert stored == {uid: {"size": raw.stat().st_size, "sha256": sha256_file(raw), "transfer_syntax": ts}}


@pytest.mark.parametrize("name", ["image_dfl.dcm", "MR_small_bigendian.dcm", "rtplan.dcm",
                                  "MR_small_RLE.dcm", "JPEG2000.dcm"])
def test_transfer_syntaxes(cli, tmp_path: Path, pydicom_files: Path, name: str) -> None:
    """Deflated, big endian, implicit VR, RLE and JPEG 2000 files are stored
    as they are, with the transfer syntax of their file meta."""
    path = pydicom_files / name
    ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    result = cli("--db", tmp_path / "db", "import-dicom", path)
    assert result.code == 0, result.err
    uid = sop_uid_of(path)
    stored = stored_instances(cli, tmp_path / "db")
    assert stored == {uid: {"size": path.stat().st_size, "sha256": sha256_file(path), "transfer_syntax": ts}}
    assert stored_bytes(tmp_path / "db")[uid] == path.read_bytes()  # type: ignore[index]


def test_complete_header_without_pixel_data_is_kept(cli, tmp_path: Path, pydicom_files: Path) -> None:
    """pydicom's charset files are MR headers whose pixel data was left out:
    complete data sets, so a backup keeps them byte for byte."""
    charset = pydicom_files.parent / "charset_files"
    chosen = [charset / n for n in ("chrJapMulti.dcm", "chrKoreanMulti.dcm")]
    for path in chosen:
        ds = pydicom.dcmread(path)
        assert "Rows" in ds and "PixelData" not in ds, f"{path.name} no longer fits this test"
    res = cli("--db", tmp_path / "db", "import-dicom", *chosen, "--json")
    assert res.code == 0, res.err
    stored = stored_instances(cli, tmp_path / "db")
    assert set(stored) == {sop_uid_of(p) for p in chosen}
    assert {v["sha256"] for v in stored.values()} == {sha256_file(p) for p in chosen}


def test_dicomdir_is_ignored_and_not_a_problem(cli, tmp_path: Path, pydicom_files: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    dicomdirs = sorted((pydicom_files / "dicomdirtests").rglob("DICOMDIR*"))
    assert len(dicomdirs) >= 3
    for i, d in enumerate(dicomdirs):
        shutil.copy(d, src / f"{i}-{d.name}")
    only = cli("--db", tmp_path / "db1", "import-dicom", src, "--json")
    assert only.code == 0, only.err
    assert only.json()["counts"] == {"file": {"ignored": len(dicomdirs)}}
    assert stored_instances(cli, tmp_path / "db1") == {}
    shutil.copy(pydicom_files / "CT_small.dcm", src / "ct")
    mixed = cli("--db", tmp_path / "db2", "import-dicom", src, "--json")
    assert mixed.code == 0, mixed.err
    assert mixed.json()["problems"] == []
    assert set(stored_instances(cli, tmp_path / "db2")) == {sop_uid_of(src / "ct")}


# ----------------------------------------------------------------- bad input
TRUNCATIONS = [
    ("CT_small.dcm", "header-value"),  # native, explicit VR little endian
    ("CT_small.dcm", "header-element-tag"),
    ("CT_small.dcm", "rows-value"),
    ("CT_small.dcm", "pixel-element-tag"),
    ("CT_small.dcm", "pixel-data"),
    ("MR_small_bigendian.dcm", "header-value"),  # native, big endian
    ("MR_small_bigendian.dcm", "pixel-data"),
    ("rtplan.dcm", "header-value"),  # implicit VR, no pixel data
    ("JPEG2000.dcm", "header-value"),  # encapsulated
    ("JPEG2000.dcm", "pixel-data"),
    ("MR_small_RLE.dcm", "pixel-data"),
]


@pytest.mark.parametrize(("name", "where"), TRUNCATIONS)
def test_truncated_copy_is_rejected(cli, tmp_path: Path, pydicom_files: Path, name: str, where: str) -> None:
    original = pydicom_files / name
    whole = cli("--db", tmp_path / "good", "import-dicom", original)
    assert whole.code == 0, "the intact file must be accepted, or this test proves nothing"
    cut = tmp_path / f"cut-{where}.dcm"
    cut.write_bytes(original.read_bytes()[:cut_point(original, where)])
    result = cli("--db", tmp_path / "db", "import-dicom", cut)
    assert result.code == 2
    assert "Traceback" not in result.err
    assert_one_reason_line(result.err, cut)
    assert stored_instances(cli, tmp_path / "db") == {}


def test_truncated_deflated_file_is_rejected(cli, tmp_path: Path, pydicom_files: Path) -> None:
    data = (pydicom_files / "image_dfl.dcm").read_bytes()
    cut = tmp_path / "dfl-cut"
    cut.write_bytes(data[: len(data) // 2])
    result = cli("--db", tmp_path / "db", "import-dicom", cut)
    assert result.code == 2
    assert "Traceback" not in result.err
    assert_one_reason_line(result.err, cut)


def _without(src: Path, dst: Path, *keywords: str) -> None:
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(
        entropy_srcs=[str(dst)])
    for kw in keywords:
        delattr(ds, kw)
        if kw == "SOPInstanceUID":
            del ds.file_meta.MediaStorageSOPInstanceUID
    ds.save_as(dst)


@pytest.fixture
def bad_files(tmp_path: Path, pydicom_files: Path) -> list[Path]:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.dcm").write_bytes(b"")
    (bad / "notes.txt").write_text("Not an image.\nJust some text.\n")
    rng = random.Random(20240611)
    (bad / "random.bin").write_bytes(rng.randbytes(5000))
    (bad / "fake-part10.dcm").write_bytes(b"\0" * 128 + b"DICM" + rng.randbytes(3000))
    ct = (pydicom_files / "CT_small.dcm").read_bytes()
    (bad / "ct-cut-header").write_bytes(ct[: cut_point(pydicom_files / "CT_small.dcm", "header-value")])
    (bad / "ct-cut-pixels").write_bytes(ct[: cut_point(pydicom_files / "CT_small.dcm", "pixel-data")])
    j2k = (pydicom_files / "JPEG2000.dcm").read_bytes()
    (bad / "j2k-cut-pixels").write_bytes(j2k[: cut_point(pydicom_files / "JPEG2000.dcm", "pixel-data")])
    (bad / "cut-in-meta").write_bytes(ct[:141])
    _without(pydicom_files / "CT_small.dcm", bad / "no-series.dcm", "SeriesInstanceUID")
    _without(pydicom_files / "CT_small.dcm", bad / "no-study.dcm", "StudyInstanceUID")
    _without(pydicom_files / "CT_small.dcm", bad / "no-sop.dcm", "SOPInstanceUID")
    return sorted(bad.iterdir())


def test_bad_files_one_line_each_and_the_batch_goes_on(cli, tmp_path: Path, pydicom_files: Path,
                                                       bad_files: list[Path]) -> None:
    good = tmp_path / "good.dcm"
    shutil.copy(pydicom_files / "MR_small.dcm", good)
    result = cli("--db", tmp_path / "db", "import-dicom", bad_files[0].parent, good, "--json")
    assert "Traceback" not in result.err
    assert result.code == 1, "partly done"
    for f in bad_files:
        assert_one_reason_line(result.err, f)
    report = result.json()
    assert report["counts"] == {"file": {"rejected": len(bad_files)}, "instance": {"stored": 1}}
    assert {p["item"] for p in report["problems"]} == {str(f) for f in bad_files}
    stored = stored_instances(cli, tmp_path / "db")
    assert stored == {sop_uid_of(good): {"size": good.stat().st_size, "sha256": sha256_file(good),
                                         "transfer_syntax": "1.2.840.10008.1.2.1"}}
    assert set(store_files(tmp_path / "db")) == {sha256_file(good)}


def test_nothing_good_exits_2(cli, tmp_path: Path, bad_files: list[Path]) -> None:
    result = cli("--db", tmp_path / "db", "import-dicom", *bad_files)
    assert result.code == 2
    assert "Traceback" not in result.err
    for f in bad_files:
        assert_one_reason_line(result.err, f)
    assert stored_instances(cli, tmp_path / "db") == {}


def test_missing_path_is_named(cli, tmp_path: Path, pydicom_files: Path) -> None:
    missing = tmp_path / "no-such-folder"
    result = cli("--db", tmp_path / "db", "import-dicom", missing, pydicom_files / "CT_small.dcm")
    assert result.code == 1
    assert "Traceback" not in result.err
    assert_one_reason_line(result.err, missing)


# ----------------------------------------------------------------- duplicates and conflicts
@pytest.fixture
def variant(tmp_path: Path, pydicom_files: Path) -> Path:
    """CT_small.dcm with other content under the same UIDs."""
    ds = pydicom.dcmread(pydicom_files / "CT_small.dcm")
    ds.StudyDescription = "edited after the fact"
    path = tmp_path / "variant.dcm"
    ds.save_as(path)
    assert sop_uid_of(path) == sop_uid_of(pydicom_files / "CT_small.dcm")
    assert sha256_file(path) != sha256_file(pydicom_files / "CT_small.dcm")
    return path


def test_same_uid_same_bytes_is_unchanged(cli, tmp_path: Path, pydicom_files: Path) -> None:
    original = pydicom_files / "CT_small.dcm"
    copies = tmp_path / "copies"
    copies.mkdir()
    for name in ("a", "b"):
        shutil.copy(original, copies / name)
    first = cli("--db", tmp_path / "db", "import-dicom", copies, "--json")
    assert first.code == 0, first.err
    assert first.json()["counts"] == {"instance": {"stored": 1, "unchanged": 1}}
    again = cli("--db", tmp_path / "db", "import-dicom", original, "--json")
    assert again.code == 0, again.err
    assert again.json()["counts"] == {"instance": {"unchanged": 1}}
    assert stored_instances(cli, tmp_path / "db") == {
        sop_uid_of(original): {"size": original.stat().st_size, "sha256": sha256_file(original),
                               "transfer_syntax": "1.2.840.10008.1.2.1"}}
    assert len(store_files(tmp_path / "db")) == 1


def test_same_uid_other_bytes_is_a_reported_conflict(cli, tmp_path: Path, pydicom_files: Path,
                                                     variant: Path) -> None:
    original = pydicom_files / "CT_small.dcm"
    uid = sop_uid_of(original)
    assert cli("--db", tmp_path / "db", "import-dicom", original).code == 0
    before = stored_instances(cli, tmp_path / "db")
    result = cli("--db", tmp_path / "db", "import-dicom", variant, "--json")
    assert result.code != 0
    assert "Traceback" not in result.err
    report = result.json()
    assert report["counts"] == {"instance": {"conflict": 1}}
    assert [(p["item"], p["outcome"]) for p in report["problems"]] == [(uid, "conflict")]
    assert [line for line in result.err.splitlines() if uid in line and "conflict" in line]
    assert stored_instances(cli, tmp_path / "db") == before
    assert stored_bytes(tmp_path / "db")[uid] == original.read_bytes()  # type: ignore[index]


def test_conflict_overwrite_replaces(cli, tmp_path: Path, pydicom_files: Path, variant: Path) -> None:
    original = pydicom_files / "CT_small.dcm"
    uid = sop_uid_of(original)
    assert cli("--db", tmp_path / "db", "import-dicom", original).code == 0
    result = cli("--db", tmp_path / "db", "import-dicom", variant, "--on-conflict", "overwrite", "--json")
    assert result.code == 0, result.err
    assert result.json()["counts"] == {"instance": {"overwritten": 1}}
    stored = stored_instances(cli, tmp_path / "db")
    assert stored[uid]["sha256"] == sha256_file(variant)  # type: ignore[index]
    assert stored_bytes(tmp_path / "db")[uid] == variant.read_bytes()  # type: ignore[index]
    assert set(store_files(tmp_path / "db")) == {sha256_file(variant)}, "the replaced file must go"


def test_conflict_fail_changes_nothing(cli, tmp_path: Path, pydicom_files: Path, variant: Path) -> None:
    original = pydicom_files / "CT_small.dcm"
    assert cli("--db", tmp_path / "db", "import-dicom", original).code == 0
    before, files_before = stored_instances(cli, tmp_path / "db"), set(store_files(tmp_path / "db"))
    batch = tmp_path / "batch"
    batch.mkdir()
    shutil.copy(pydicom_files / "MR_small.dcm", batch / "1-new.dcm")  # new, sorted before the conflict
    shutil.copy(variant, batch / "2-variant.dcm")
    result = cli("--db", tmp_path / "db", "import-dicom", batch, "--on-conflict", "fail")
    assert result.code == 2
    assert "dicomvault: error:" in result.err
    assert "Traceback" not in result.err
    assert stored_instances(cli, tmp_path / "db") == before
    assert set(store_files(tmp_path / "db")) == files_before


# ----------------------------------------------------------------- concurrency
@pytest.mark.slow
def test_two_ingests_of_one_folder_at_once(cli, tmp_path: Path, pydicom_files: Path) -> None:
    folder = str(pydicom_files)  # over a hundred files: the parallel header parsing path
    db = tmp_path / "db"
    env = dict(os.environ, DICOMVAULT_DB=str(tmp_path / "unused"), DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD="1")
    cmd = [sys.executable, "-m", "dicomvault", "--db", str(db), "import-dicom", folder, "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    reports = []
    for p, (out, err) in zip(procs, outs, strict=True):
        assert "Traceback" not in err
        assert p.returncode == 1, err  # the folder holds broken files
        reports.append(json.loads(out))
        assert "failed" not in reports[-1]["counts"]["instance"], reports[-1]["problems"]
    reference = cli("--db", tmp_path / "ref", "import-dicom", folder, "--json")
    expected = stored_instances(cli, tmp_path / "ref")
    stored = stored_instances(cli, db)
    assert set(stored) == set(expected)
    assert sum(r["counts"]["instance"].get("stored", 0) for r in reports) == len(stored), \
        "each instance must be stored exactly once over both runs"
    assert reference.json()["counts"]["instance"]["stored"] == len(expected)
    assert set(store_files(db)) == {r["sha256"] for r in stored.values()}


@pytest.mark.slow
def test_concurrent_first_use_of_a_new_database(tmp_path: Path) -> None:
    """Several commands opening a database path that does not exist yet all
    succeed: none mistakes the other's half-created layout for a foreign folder."""
    env = dict(os.environ, DICOMVAULT_DB=str(tmp_path / "unused"), DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD="1")
    empty = tmp_path / "nothing-to-import"
    empty.mkdir()
    for attempt in range(3):
        db = tmp_path / f"db{attempt}"
        cmd = [sys.executable, "-m", "dicomvault", "--db", str(db), "import-dicom", str(empty)]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(4)]
        for p in procs:
            _out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err


def test_odd_file_name_is_named_in_full(cli, tmp_path: Path) -> None:
    odd = tmp_path / "odd name: really.dcm"
    odd.write_text("plain text")
    result = cli("--db", tmp_path / "db", "import-dicom", odd)
    assert result.code == 2
    assert_one_reason_line(result.err, odd)
