"""Manifest pages (format 1.1, required feature "manifest-pages"): instance
entries written as page frames between the data frames instead of all in the
manifest, so that neither writer nor reader holds every entry at once.

The real corpus (pydicom and pydicom-data, as in test_roundtrip.py) is
exported with ``bkp_plugin.PAGE_ENTRIES`` set to 3, so that its ~150
instances make dozens of pages; memory is measured on synthetic files of
thousands of tiny instances.
"""
from __future__ import annotations

import hashlib
import io
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import zstandard

from bkp_synth import CT_CLASS, EXPLICIT_LE, Builder, hierarchy, uid
from bkputil import reseal_manifest
from dicomvault.engine import (
    EXIT_OK,
    EXIT_PARTIAL,
    Attributes,
    ChecksumError,
    ConflictPolicy,
    CorruptError,
    InstanceRecord,
    Item,
    Outcome,
    UnsupportedFeatureError,
)
from dicomvault.formats.bkp import layout
from dicomvault.formats.bkp import reader as reader_module
from dicomvault.formats.bkp.layout import FOOTER, FRAME, FRAME_PAGE, PAGE_SEQ_BASE, pack_frame_header, xxh3
from dicomvault.formats.bkp.manifest import FEATURE_PAGES, KNOWN_FEATURES, InstanceEntry, Manifest
from dicomvault.formats.bkp.reader import BkpReader
from dicomvault.formats.bkp.writer import BkpWriter
from dicomvault.plugins import bkp_plugin
from test_roundtrip import catalog, check_consistent, instances_of, run

PAGE = 3  # entries per page in the exports of the real corpus
PASSPHRASE = "pages are sealed too \u2713"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass
class Corpus:
    db: Path
    plain: Path  # exported with the default PAGE_ENTRIES: no pages
    paged: Path  # exported with PAGE_ENTRIES = PAGE
    encrypted: Path  # the same, encrypted
    cat: dict


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, real_dicom: list[str]) -> Corpus:
    root = tmp_path_factory.mktemp("pages")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DICOMVAULT_DB", str(root / "default-db"))
        mp.setenv("DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD", "1")
        mp.setenv("DV_PAGES_PASS", PASSPHRASE)
        db = root / "db"
        ingest = run("--db", db, "import-dicom", *real_dicom, "--json")
        assert ingest.code == 1, ingest.err  # pydicom ships broken and duplicate files on purpose
        cat = catalog(db)
        n = len(cat["instances"])
        assert n > 30 * PAGE
        # Instance-level attributes: the export target must find instances written out in pages
        # (the tail holds fewer than PAGE entries, so at least one of these is in a page).
        annotated = sorted(cat["instances"])[:PAGE + 1]
        series = sorted(cat["series"])[0]
        (root / "voi.csv").write_bytes(b"roi,label\n1,liver\n" * 50)
        steps: list[tuple[object, ...]] = [("annotate", "--instance", u, "--comment", f"key image {i}")
                                           for i, u in enumerate(annotated)]
        steps += [("annotate", "--series", series, "--tag", "paged"),
                  ("attach", root / "voi.csv", "--series", series)]
        for step in steps:
            res = run("--db", db, *step)
            assert res.code == 0, (step, res.err)
        corpus = Corpus(db=db, plain=root / "plain.bkp", paged=root / "paged.bkp",
                        encrypted=root / "encrypted.bkp", cat=catalog(db))
        assert n < bkp_plugin.PAGE_ENTRIES  # the default: no pages
        res = run("--db", db, "export-db", corpus.plain, "--whole", "--json")
        assert res.code == 0, res.err
        mp.setattr(bkp_plugin, "PAGE_ENTRIES", PAGE)
        res = run("--db", db, "export-db", corpus.paged, "--whole", "--json")
        assert res.code == 0, res.err
        assert res.json()["counts"]["attributes"] == {"stored": len(annotated) + 1}, res.out
        res = run("--db", db, "export-db", corpus.encrypted, "--whole", "--encrypt",
                  "--passphrase-env", "DV_PAGES_PASS", "--json")
        assert res.code == 0, res.err
        assert res.json()["counts"]["attributes"] == {"stored": len(annotated) + 1}, res.out
    return corpus


def _entries(path: Path, passphrase: str | None = None) -> dict[str, InstanceEntry]:
    reader = BkpReader(path, passphrase=passphrase)
    try:
        out: dict[str, InstanceEntry] = {}
        for e in reader.iter_instances():
            assert e.record.sop_uid not in out, f"{e.record.sop_uid} listed twice"
            out[e.record.sop_uid] = e
        return out
    finally:
        reader.close()


def _page_sops(path: Path, k: int) -> set[str]:
    reader = BkpReader(path)
    try:
        return {e.record.sop_uid for e in reader.read_page(k)}
    finally:
        reader.close()


def _shas(path: Path) -> dict[str, str]:
    return {u: e.record.sha256 for u, e in _entries(path).items()}


def _db_shas(db: Path) -> dict[str, str]:
    if not (db / "catalog.sqlite").exists():
        return {}
    return {u: row[6] for u, row in catalog(db)["instances"].items()}


# ---------------------------------------------------------------------- 1. the export, end to end


def test_export_writes_many_pages_between_the_data_frames(corpus: Corpus) -> None:
    cat = corpus.cat
    reader = BkpReader(corpus.paged)
    try:
        m = reader.manifest
        assert len(reader.pages) > 1
        assert FEATURE_PAGES in m.required_features
        assert (m.major, m.minor) == (1, 1) and (reader.major, reader.minor) == (1, 1)
        assert len(m.instances) < PAGE  # the manifest keeps only the tail
        assert [p.count for p in reader.pages] == [PAGE] * len(reader.pages)
        assert reader.instance_count == len(cat["instances"])
        offsets = [p.offset for p in reader.pages]
        assert offsets == sorted(offsets)
        frame_offsets = [fe.offset for fe in m.frames]
        assert len(frame_offsets) > 1
        # written as they fill, between data frames: not gathered at the end
        assert offsets[0] < frame_offsets[-1]
        assert not set(offsets) & set(frame_offsets)
        seen: dict[str, InstanceEntry] = {}
        for k, page in enumerate(reader.pages):
            entries = reader.read_page(k)
            assert page.series == list(dict.fromkeys(e.record.series_uid for e in entries)), k
            for e in entries:
                assert e.record.sop_uid not in seen
                seen[e.record.sop_uid] = e
        for e in m.instances:
            assert e.record.sop_uid not in seen
            seen[e.record.sop_uid] = e
        assert set(seen) == set(cat["instances"])
        assert [e.record.sop_uid for e in reader.iter_instances()] == \
            [e.record.sop_uid for e in m.instances] + [e.record.sop_uid for k in range(len(reader.pages))
                                                       for e in reader.read_page(k)]
        for u, e in seen.items():
            row = cat["instances"][u]
            r = e.record
            assert (r.sop_uid, r.series_uid, r.sop_class_uid, r.transfer_syntax, r.number, r.size,
                    r.sha256, r.imported_at, r.origin) == row
            with reader.open_blob(e.blob) as fh:
                assert hashlib.sha256(fh.read()).hexdigest() == row[6], u
    finally:
        reader.close()


def test_bkp_tools_see_every_instance_of_a_paged_file(cli, corpus: Corpus) -> None:  # type: ignore[no-untyped-def]
    n = len(corpus.cat["instances"])
    for action in ("validate", "verify"):
        res = cli("bkp", action, corpus.paged, "--json")
        assert res.code == EXIT_OK, res.out
        result = res.json()
        assert result["valid"] and result["instances"] == n, result
        assert [f for f in result["findings"] if f["severity"] == "error"] == []
    res = cli("bkp", "inspect", corpus.paged, "--json")
    assert res.code == EXIT_OK, res.err
    assert res.json()["instances"] == n
    res = cli("bkp", "ls", corpus.paged, "--level", "instance", "--json")
    assert res.code == EXIT_OK, res.err
    listed = [i["sop_uid"] for p in res.json() for st in p["studies"] for se in st["series"]
              for i in se["items"]]
    assert sorted(listed) == sorted(corpus.cat["instances"])


def test_ls_reads_the_pages_but_no_data_frame(cli, corpus: Corpus, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = bytearray(corpus.paged.read_bytes())
    reader = BkpReader(corpus.paged)
    for fe in reader.manifest.frames:
        data[fe.offset + FRAME.size] ^= 0xFF
    reader.close()
    damaged = tmp_path / "frames-damaged.bkp"
    damaged.write_bytes(bytes(data))
    res = cli("bkp", "ls", damaged, "--level", "series", "--json")
    assert res.code == EXIT_OK, res.err
    counts = {se["uid"]: se["instances"] for p in res.json() for st in p["studies"] for se in st["series"]}
    expected: dict[str, int] = {}
    for row in corpus.cat["instances"].values():
        expected[row[1]] = expected.get(row[1], 0) + 1
    assert {k: v for k, v in counts.items() if v} == expected
    assert cli("bkp", "verify", damaged).code == EXIT_PARTIAL  # the damage is real


def test_whole_import_restores_every_instance_byte_identical(cli, corpus: Corpus, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = corpus.cat
    restored = tmp_path / "restored"
    res = cli("--db", restored, "import-db", corpus.paged, "--json")
    assert res.code == EXIT_OK, res.err
    report = res.json()
    assert report["counts"]["instance"] == {"stored": len(src["instances"])}
    assert report["counts"]["attributes"] == {"stored": len(src["attributes"])}
    assert report["counts"]["attachment"] == {"stored": len(src["attachments"])}
    for other in (restored, corpus.paged):
        res = cli("--db", corpus.db, "compare", other, "--whole", "--json")
        assert res.code == EXIT_OK, res.err
        assert res.json()["counts"]["instance"] == {"unchanged": len(src["instances"])}
    got = catalog(restored)
    for part in src:
        assert got[part] == src[part], part
    assert check_consistent(restored) == check_consistent(corpus.db)


def _series_over_several_pages(path: Path) -> tuple[str, list[int], int]:
    """A series named by more than one page but not by all: (uid, its pages, number of pages)."""
    reader = BkpReader(path)
    try:
        pages: dict[str, list[int]] = {}
        for k, page in enumerate(reader.pages):
            for s in page.series:
                pages.setdefault(s, []).append(k)
        total = len(reader.pages)
    finally:
        reader.close()
    candidates = sorted((len(ks), s) for s, ks in pages.items() if 1 < len(ks) < total)
    assert candidates
    series = candidates[-1][1]
    return series, pages[series], total


def test_selective_import_restores_exactly_one_series(cli, corpus: Corpus, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    series, _pages, _total = _series_over_several_pages(corpus.paged)
    wanted = instances_of(corpus.cat, series=series)
    assert 1 < len(wanted) < len(corpus.cat["instances"])
    restored = tmp_path / "restored"
    res = cli("--db", restored, "import-db", corpus.paged, "--series", series, "--json")
    assert res.code == EXIT_OK, res.err
    assert res.json()["counts"]["instance"] == {"stored": len(wanted)}
    got = catalog(restored)
    assert set(got["instances"]) == wanted
    for u in wanted:
        assert got["instances"][u] == corpus.cat["instances"][u]
    assert set(got["series"]) == {series}
    res = cli("--db", corpus.db, "compare", restored, "--series", series, "--json")
    assert res.code == EXIT_OK, res.err
    assert res.json()["counts"]["instance"] == {"unchanged": len(wanted)}


# ---------------------------------------------------------------------- 2. selective reading


def test_selective_iteration_reads_only_the_pages_naming_the_series(
        corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    everything = _entries(corpus.paged)
    calls: list[int] = []
    original = BkpReader.read_page

    def spy(self: BkpReader, k: int) -> list[InstanceEntry]:
        calls.append(k)
        return original(self, k)

    monkeypatch.setattr(BkpReader, "read_page", spy)
    reader = BkpReader(corpus.paged)
    try:
        assert reader.bytes_read == 0  # opening reads no page
        all_page_bytes = sum(FRAME.size + p.stored for p in reader.pages)
        fewest = all_page_bytes
        all_series = {e.record.series_uid for e in everything.values()}
        assert len(all_series) > 5
        for series in sorted(all_series):
            naming = [k for k, p in enumerate(reader.pages) if series in p.series]
            calls.clear()
            before = reader.bytes_read
            chunks = list(reader.instance_chunks({series}))
            assert all(isinstance(c, list) and c for c in chunks)
            got = [e for c in chunks for e in c]
            assert calls == naming, series
            assert reader.bytes_read - before == sum(FRAME.size + reader.pages[k].stored for k in naming)
            fewest = min(fewest, reader.bytes_read - before)
            assert sorted(e.record.sop_uid for e in got) == \
                sorted(u for u, e in everything.items() if e.record.series_uid == series)
            assert [e.record.sop_uid for e in reader.iter_instances({series})] == \
                [e.record.sop_uid for e in got]
        assert fewest < all_page_bytes // 4
        # a series the file does not hold: nothing read at all
        before = reader.bytes_read
        calls.clear()
        assert list(reader.iter_instances({"1.2.3.4.5.6.7.8.9"})) == []
        assert calls == [] and reader.bytes_read == before
        # and no filter reads every page once
        before = reader.bytes_read
        calls.clear()
        assert len(list(reader.iter_instances())) == len(everything)
        assert calls == list(range(len(reader.pages)))
        assert reader.bytes_read - before == all_page_bytes
    finally:
        reader.close()


# ---------------------------------------------------------------------- 3. damage


@dataclass
class Damaged:
    path: Path
    page: int
    offset: int
    lost: set[str]  # the SOP UIDs whose entries are in the damaged page


@pytest.fixture(scope="module")
def damaged(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Damaged:
    reader = BkpReader(corpus.paged)
    k = len(reader.pages) // 2
    page = reader.pages[k]
    reader.close()
    data = bytearray(corpus.paged.read_bytes())
    data[page.offset + FRAME.size + page.stored // 2] ^= 0x01
    path = tmp_path_factory.mktemp("damaged-page") / "damaged.bkp"
    path.write_bytes(bytes(data))
    lost = _page_sops(corpus.paged, k)
    assert len(lost) == PAGE
    return Damaged(path, k, page.offset, lost)


def test_a_damaged_page_is_a_checksum_error_naming_the_page(corpus: Corpus, damaged: Damaged) -> None:
    reader = BkpReader(damaged.path)  # opening does not read pages
    try:
        with pytest.raises(ChecksumError, match=rf"\bpage {damaged.page}\b.*checksum"):
            reader.read_page(damaged.page)
        with pytest.raises(ChecksumError, match=rf"\bpage {damaged.page}\b"):
            list(reader.iter_instances())
        # the other pages are fine, and a selection that skips the damaged page reads
        for k in range(len(reader.pages)):
            if k != damaged.page:
                assert len(reader.read_page(k)) == PAGE
        away = {e.record.series_uid for e in _entries(corpus.paged).values()} - \
            set(reader.pages[damaged.page].series)
        got = {e.record.sop_uid for e in reader.iter_instances(away)}
        assert got and got == {u for u, e in _entries(corpus.paged).items() if e.record.series_uid in away}
    finally:
        reader.close()


def test_import_of_a_file_with_a_damaged_page_restores_the_rest_and_names_it(  # type: ignore[no-untyped-def]
        cli, corpus: Corpus, damaged: Damaged, tmp_path: Path) -> None:
    """A damaged page is one rejected item naming the page and the number of instances it
    lists; everything the other pages and the manifest list is restored (exit 1)."""
    restored = tmp_path / "restored"
    res = cli("--db", restored, "import-db", damaged.path, "--json")
    assert res.code == EXIT_PARTIAL, (res.out, res.err)
    assert "Traceback" not in res.err
    report = res.json()
    assert report["counts"]["file"] == {"rejected": 1}
    assert any(f"page {damaged.page} " in line and "checksum" in line and "were not restored" in line
               for line in res.err.splitlines()), res.err
    expected = {u: e.record.sha256 for u, e in _entries(corpus.paged).items() if u not in damaged.lost}
    assert {u: sha for u, sha in _db_shas(restored).items()} == expected


def test_a_series_outside_the_damaged_page_still_imports(cli, corpus: Corpus, damaged: Damaged,  # type: ignore[no-untyped-def]
                                                        tmp_path: Path) -> None:
    reader = BkpReader(damaged.path)
    bad_series = set(reader.pages[damaged.page].series)
    reader.close()
    series, _pages, _total = _series_over_several_pages(corpus.paged)
    if series in bad_series:
        series = sorted({row[1] for row in corpus.cat["instances"].values()} - bad_series)[-1]
    wanted = instances_of(corpus.cat, series=series)
    restored = tmp_path / "restored"
    res = cli("--db", restored, "import-db", damaged.path, "--series", series, "--json")
    assert res.code == EXIT_OK, res.err
    assert set(_db_shas(restored)) == wanted


def test_verify_and_validate_report_the_damaged_page(cli, damaged: Damaged) -> None:  # type: ignore[no-untyped-def]
    for action in ("validate", "verify"):
        res = cli("bkp", action, damaged.path, "--json")
        assert res.code == EXIT_PARTIAL, (action, res.out)
        result = res.json()
        assert not result["valid"]
        errors = [f for f in result["findings"] if f["severity"] == "error"]
        assert errors and all(f["code"] == "page.checksum" for f in errors), errors
        assert any(f.get("offset") == damaged.offset and f"page {damaged.page} " in f["message"]
                   for f in errors), errors


def test_salvage_of_an_intact_paged_file_is_complete(cli, corpus: Corpus, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "salvaged.bkp"
    res = cli("bkp", "salvage", corpus.paged, out, "--json")
    assert res.code == EXIT_OK, res.out
    result = res.json()
    assert result["method"] == "manifest" and result["verified"]
    assert result["instances_recovered"] == len(corpus.cat["instances"])
    assert result["attachments_recovered"] == len(corpus.cat["attachments"])
    assert _shas(out) == _shas(corpus.paged)


def test_salvage_of_a_damaged_page_keeps_the_rest_and_scans_for_its_instances(  # type: ignore[no-untyped-def]
        cli, corpus: Corpus, damaged: Damaged, tmp_path: Path) -> None:
    """SPEC.md 16: what the manifest and the intact pages list is recovered and verified (with
    attributes and attachments); the damaged page is named as lost, and a scan of the data frames
    (all intact here) then finds the instances of that page that are Part 10 files, unverified."""
    out = tmp_path / "salvaged.bkp"
    res = cli("bkp", "salvage", damaged.path, out, "--json")
    assert res.code == EXIT_PARTIAL, res.out
    result = res.json()
    assert (result["method"], result["verified"], result["frames_damaged"]) == ("manifest+scan", False, 0)
    assert any(line.startswith(f"page {damaged.page} ") for line in result["lost"]), result["lost"]
    assert result["attachments_recovered"] == len(corpus.cat["attachments"])
    assert cli("bkp", "verify", out).code == EXIT_OK
    original = _shas(corpus.paged)
    recovered = _shas(out)
    assert len(recovered) == result["instances_recovered"]
    assert {u: original.get(u) for u in recovered} == recovered  # byte-identical, nothing invented
    outside = {u for u in original if u not in damaged.lost}
    assert outside <= set(recovered), sorted(outside - set(recovered))  # everything the rest lists
    reader = BkpReader(corpus.paged)
    try:
        part10 = set()
        for e in reader.iter_instances():
            with reader.open_blob(e.blob) as fh:
                if fh.read(132)[128:] == b"DICM":
                    part10.add(e.record.sop_uid)
    finally:
        reader.close()
    assert part10 & damaged.lost
    assert part10 <= set(recovered), sorted(part10 - set(recovered))


def test_salvage_of_an_encrypted_file_with_a_damaged_page_recovers_the_rest(  # type: ignore[no-untyped-def]
        cli, corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reader = BkpReader(corpus.encrypted, passphrase=PASSPHRASE)
    try:
        k = len(reader.pages) // 2
        page = reader.pages[k]
        lost = {e.record.sop_uid for e in reader.read_page(k)}
        original = {e.record.sop_uid: e.record.sha256 for e in reader.iter_instances()}
    finally:
        reader.close()
    data = bytearray(corpus.encrypted.read_bytes())
    data[page.offset + FRAME.size + page.stored // 2] ^= 0x01
    bad = tmp_path / "damaged.bkp"
    bad.write_bytes(bytes(data))
    monkeypatch.setenv("DV_PASS", PASSPHRASE)
    out = tmp_path / "salvaged.bkp"
    res = cli("bkp", "salvage", bad, out, "--passphrase-env", "DV_PASS", "--json")
    assert res.code == EXIT_PARTIAL, (res.out, res.err)
    reader = BkpReader(out, passphrase=PASSPHRASE)
    try:
        recovered = {e.record.sop_uid: e.record.sha256 for e in reader.iter_instances()}
    finally:
        reader.close()
    outside = {u: sha for u, sha in original.items() if u not in lost}
    assert {u: recovered.get(u) for u in outside} == outside


@pytest.mark.parametrize("lie", ["series", "count", "offset", "feature"])
def test_a_page_index_that_lies_is_caught(cli, corpus: Corpus, tmp_path: Path, lie: str) -> None:  # type: ignore[no-untyped-def]
    reader = BkpReader(corpus.paged)
    k = next(k for k, p in enumerate(reader.pages) if len(p.series) > 1)
    reader.close()

    def edit(m: dict) -> None:
        pages = m["pages"]  # array-like entries: offset, stored, raw, codec, count, series
        if lie == "series":
            pages[k][5] = pages[k][5][1:]
        elif lie == "count":
            pages[k][4] += 1
        elif lie == "offset":
            pages[k][0] = pages[k + 1][0]
        else:
            m["required_features"].remove(FEATURE_PAGES)

    bad = tmp_path / f"{lie}.bkp"
    bad.write_bytes(reseal_manifest(corpus.paged.read_bytes(), edit))
    with pytest.raises(CorruptError, match="page" if lie != "feature" else FEATURE_PAGES):
        reader = BkpReader(bad)
        try:
            list(reader.iter_instances())
        finally:
            reader.close()
    res = cli("bkp", "validate", bad, "--json")
    assert res.code == EXIT_PARTIAL, res.out
    assert any(f["code"].startswith("page.") for f in res.json()["findings"] if f["severity"] == "error")


def test_a_page_index_naming_more_series_than_needed_is_accepted(cli, corpus: Corpus,  # type: ignore[no-untyped-def]
                                                                 tmp_path: Path) -> None:
    """SPEC.md 8.7: a series named twice, or without an entry in the page, costs a needless
    read, nothing else."""
    reader = BkpReader(corpus.paged)
    other = next(s for s in reader.pages[1].series if s not in reader.pages[0].series)
    reader.close()

    def edit(m: dict) -> None:
        m["pages"][0][5] = [*m["pages"][0][5], other, m["pages"][0][5][0]]

    loose = tmp_path / "loose.bkp"
    loose.write_bytes(reseal_manifest(corpus.paged.read_bytes(), edit))
    assert _shas(loose) == _shas(corpus.paged)
    reader = BkpReader(loose)
    try:
        before = reader.bytes_read
        got = [e.record.sop_uid for e in reader.iter_instances({other})]
        naming = [k for k, p in enumerate(reader.pages) if other in p.series]
        assert naming[0] == 0
        assert reader.bytes_read - before == sum(FRAME.size + reader.pages[k].stored for k in naming)
    finally:
        reader.close()
    assert sorted(got) == sorted(instances_of(corpus.cat, series=other))
    res = cli("bkp", "validate", loose, "--json")
    assert res.code == EXIT_OK, res.out


# ---------------------------------------------------------------------- 4. encryption


def test_encrypted_paged_export_round_trip(cli, corpus: Corpus, tmp_path: Path,  # type: ignore[no-untyped-def]
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    reader = BkpReader(corpus.encrypted, passphrase=PASSPHRASE)
    try:
        assert reader.encrypted and len(reader.pages) > 1
        assert {FEATURE_PAGES, "aes-256-gcm"} <= set(reader.manifest.required_features)
        assert reader.instance_count == len(corpus.cat["instances"])
        assert sorted(e.record.sop_uid for e in reader.iter_instances()) == sorted(corpus.cat["instances"])
    finally:
        reader.close()
    monkeypatch.setenv("DV_PASS", PASSPHRASE)
    restored = tmp_path / "restored"
    res = cli("--db", restored, "import-db", corpus.encrypted, "--passphrase-env", "DV_PASS", "--json")
    assert res.code == EXIT_OK, res.err
    got = catalog(restored)
    for part in corpus.cat:
        assert got[part] == corpus.cat[part], part
    assert check_consistent(restored) == check_consistent(corpus.db)
    res = cli("--db", corpus.db, "compare", corpus.encrypted, "--whole", "--passphrase-env", "DV_PASS",
              "--json")
    assert res.code == EXIT_OK, res.err
    assert cli("bkp", "verify", corpus.encrypted, "--passphrase-env", "DV_PASS").code == EXIT_OK


def _clear_page(payload: bytes, codec: int) -> bytes | None:
    """The page's content when it can be read without a key (zstd or as is), else None."""
    try:
        content = zstandard.ZstdDecompressor().decompress(payload) if codec == 1 else payload
        msgspec.msgpack.decode(content)
    except (zstandard.ZstdError, msgspec.MsgspecError):
        return None
    return content


def test_encrypted_pages_hold_nothing_in_clear(corpus: Corpus) -> None:
    cat = corpus.cat
    names = {row[3].encode() for row in cat["patients"].values() if len(row[3]) >= 6}
    names |= {part.encode() for row in cat["patients"].values() for part in row[3].split("^")
              if len(part) >= 6}
    ids = {row[1].encode() for row in cat["patients"].values() if len(row[1]) >= 6}
    uids = {u.encode() for u in cat["instances"]} | {u.encode() for u in cat["series"]}
    assert len(names) > 10 and len(uids) > 100
    # Control: in the unencrypted paged file every page reads without any key, and holds its UIDs.
    plain = corpus.paged.read_bytes()
    reader = BkpReader(corpus.paged)
    pages_plain = b""
    for k, p in enumerate(reader.pages):
        content = _clear_page(plain[p.offset + FRAME.size:p.offset + FRAME.size + p.stored], p.codec)
        assert content is not None, k
        assert all(e.record.sop_uid.encode() in content for e in reader.read_page(k))
        pages_plain += content
    manifest_plain = msgspec.msgpack.encode(reader.manifest)
    reader.close()
    assert all(v in manifest_plain for v in names | ids)
    assert all(u in pages_plain + manifest_plain for u in uids)

    data = corpus.encrypted.read_bytes()
    reader = BkpReader(corpus.encrypted, passphrase=PASSPHRASE)
    try:
        sealed = b""
        for k, p in enumerate(reader.pages):
            frame = data[p.offset:p.offset + FRAME.size + p.stored]
            head = layout.unpack_frame_header(frame[:FRAME.size], p.offset)
            ftype, seq, stored = head[0], head[2], head[3]
            assert (ftype, seq, stored) == (FRAME_PAGE, PAGE_SEQ_BASE + k, p.stored)
            payload = frame[FRAME.size:]
            assert not payload.startswith(ZSTD_MAGIC) and _clear_page(payload, p.codec) is None, k
            sealed += payload
    finally:
        reader.close()
    assert [u for u in uids if u in sealed] == []
    assert sorted(v for v in names | ids if v in data) == []


def test_a_tampered_encrypted_page_fails_decryption(corpus: Corpus, tmp_path: Path) -> None:
    """The page's checksums recomputed after the change: AES-GCM still catches it."""
    reader = BkpReader(corpus.encrypted, passphrase=PASSPHRASE)
    k = 1
    p = reader.pages[k]
    reader.close()
    data = bytearray(corpus.encrypted.read_bytes())
    start = p.offset + FRAME.size
    data[start + p.stored // 2] ^= 0x01
    payload = bytes(data[start:start + p.stored])
    data[p.offset:start] = pack_frame_header(FRAME_PAGE, p.codec, PAGE_SEQ_BASE + k, p.stored, p.raw,
                                             xxh3(payload))
    bad = tmp_path / "tampered.bkp"
    bad.write_bytes(bytes(data))
    reader = BkpReader(bad, passphrase=PASSPHRASE)
    try:
        reader.read_page(0)
        with pytest.raises(ChecksumError, match=rf"\bpage {k}\b.*(decryption|AES-GCM)"):
            reader.read_page(k)
    finally:
        reader.close()


# ---------------------------------------------------------------------- 5. memory


def _synthetic(path: Path, n: int, *, page_entries: int | None = 1024, frame_size: int = 64 << 10) -> Path:
    """``n`` instances of 300 bytes in 4 series, written like BkpTarget writes them: a page
    every ``page_entries`` entries (None: all entries in the manifest)."""
    ps, sts, ses = hierarchy(1, 1, 4)
    w = BkpWriter(path, writer="dicomvault tests (pages)", frame_size=frame_size, threads=1)
    held: list[InstanceEntry] = []
    for i in range(n):
        data = i.to_bytes(4, "little") * 75
        blob = w.add_blob(io.BytesIO(data))
        rec = InstanceRecord(sop_uid=uid(7, i), series_uid=ses[i % 4].series_uid, sop_class_uid=CT_CLASS,
                             transfer_syntax=EXPLICIT_LE, number=i, size=blob.length,
                             sha256=hashlib.sha256(data).hexdigest(),
                             imported_at="2024-01-01T00:00:00+00:00", origin=f"file:/synthetic/{i:08d}.dcm")
        held.append(InstanceEntry(rec, blob))
        if page_entries is not None and len(held) >= page_entries:
            w.add_page(held)
            held = []
    w.finish(Manifest(major=0, minor=0, writer="", created="", patients=ps, studies=sts, series=ses,
                      instances=held))
    return path


def _peak(fn) -> int:  # type: ignore[no-untyped-def]
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _read_all(path: Path, n: int) -> None:
    reader = BkpReader(path)
    try:
        count = 0
        for _entry in reader.iter_instances():
            count += 1
        assert count == n
    finally:
        reader.close()


# Both sizes have at least two full pages and the same tail (500 entries), so each reading
# holds the same things at its peak: the tail, one page handed out and the next being decoded.
SMALL, LARGE = 3 * 1024 + 500, 11 * 1024 + 500
MARGIN = 256 << 10


def test_reading_memory_does_not_grow_with_the_number_of_instances(tmp_path: Path) -> None:
    small = _synthetic(tmp_path / "small.bkp", SMALL)
    large = _synthetic(tmp_path / "large.bkp", LARGE)
    inline = _synthetic(tmp_path / "inline.bkp", LARGE, page_entries=None)
    r = BkpReader(large)
    assert len(r.pages) == 11 and len(r.manifest.instances) == 500
    r.close()
    peak_small = _peak(lambda: _read_all(small, SMALL))
    peak_large = _peak(lambda: _read_all(large, LARGE))
    peak_inline = _peak(lambda: _read_all(inline, LARGE))
    bound = peak_small * 1.15 + MARGIN
    assert peak_large < bound, (peak_small, peak_large)
    # Control: the measure sees entries held all at once (the file without pages).
    assert peak_inline > 2 * bound, (peak_inline, bound)


def test_writing_memory_does_not_grow_with_the_number_of_instances(tmp_path: Path) -> None:
    peak_small = _peak(lambda: _synthetic(tmp_path / "small.bkp", SMALL))
    peak_large = _peak(lambda: _synthetic(tmp_path / "large.bkp", LARGE))
    peak_inline = _peak(lambda: _synthetic(tmp_path / "inline.bkp", LARGE, page_entries=None))
    bound = peak_small * 1.15 + MARGIN
    assert peak_large < bound, (peak_small, peak_large)
    assert peak_inline > 2 * bound, (peak_inline, bound)


SYNTHETIC = hierarchy(1, 1, 4)


def _item(i: int) -> Item:
    ps, sts, ses = SYNTHETIC
    data = i.to_bytes(4, "little") * 75
    rec = InstanceRecord(sop_uid=uid(8, i), series_uid=ses[i % 4].series_uid, sop_class_uid=CT_CLASS,
                         transfer_syntax=EXPLICIT_LE, number=i, size=len(data),
                         imported_at="2024-01-01T00:00:00+00:00", origin=f"file:/synthetic/{i:08d}.dcm")
    return Item(rec, ses[i % 4], sts[0], ps[0], lambda: io.BytesIO(data))


def _fill_target(path: Path, n: int) -> None:
    """Puts ``n`` instances into an export target (made one at a time, as a source hands
    them out); the peak is taken before ``finish``, which is measured by the writer test."""
    target = bkp_plugin.BkpTarget(str(path))
    try:
        for i in range(n):
            assert target.put_instance(_item(i), ConflictPolicy.SKIP) == (Outcome.STORED, "")
    finally:
        target.writer.abort()


def test_export_target_memory_per_instance_stays_small(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """BkpTarget keeps one page of entries, plus a hash per SOP UID written (a cheap
    "already written?" check): far below what holding the entries costs."""
    monkeypatch.setattr(bkp_plugin, "PAGE_ENTRIES", 1024)
    growth_paged = (_peak(lambda: _fill_target(tmp_path / "a.bkp", LARGE))
                    - _peak(lambda: _fill_target(tmp_path / "b.bkp", SMALL))) / (LARGE - SMALL)
    monkeypatch.setattr(bkp_plugin, "PAGE_ENTRIES", 10**9)
    growth_inline = (_peak(lambda: _fill_target(tmp_path / "c.bkp", LARGE))
                     - _peak(lambda: _fill_target(tmp_path / "d.bkp", SMALL))) / (LARGE - SMALL)
    # ~85 bytes per instance today (the hash set), ~600 when the entries are held
    assert growth_paged < 160, growth_paged
    assert growth_inline > 2.5 * 160, growth_inline  # control


# ---------------------------------------------------------------------- the export target


def test_export_target_finds_instances_already_written_in_pages(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bkp_plugin, "PAGE_ENTRIES", 2)
    path = tmp_path / "target.bkp"
    target = bkp_plugin.BkpTarget(str(path))
    items = [_item(i) for i in range(7)]
    for item in items:
        assert target.put_instance(item, ConflictPolicy.SKIP) == (Outcome.STORED, "")
    assert len(target.writer.pages) == 3
    written = [e.record.sop_uid for e in target.writer.written_entries()]
    assert written == [it.instance.sop_uid for it in items[:6]]
    first = items[0]
    sha = hashlib.sha256(first.open().read()).hexdigest()
    assert target.lookup(first.instance.sop_uid) == sha  # in page 0, not in memory
    assert target.lookup(uid(8, 999)) is None
    same = Item(msgspec.structs.replace(first.instance, sha256=sha), first.series, first.study, first.patient,
                first.open)
    assert target.put_instance(same, ConflictPolicy.SKIP) == (Outcome.UNCHANGED, "")
    assert target.put_instance(first, ConflictPolicy.SKIP) == (Outcome.UNCHANGED, "")  # no digest given
    other = Item(msgspec.structs.replace(first.instance, sha256="0" * 64), first.series, first.study,
                 first.patient, first.open)
    assert target.put_instance(other, ConflictPolicy.SKIP)[0] is Outcome.CONFLICT
    assert target.put_attributes(Attributes(level="instance", uid=first.instance.sop_uid, comment="c"),
                                 ConflictPolicy.SKIP) == (Outcome.STORED, "")
    assert target.put_attributes(Attributes(level="instance", uid=uid(8, 999), comment="c"),
                                 ConflictPolicy.SKIP)[0] is Outcome.FAILED
    target.finish(True)
    entries = _entries(path)
    # each once: the manifest's tail first, then the pages in order
    assert list(entries) == [it.instance.sop_uid for it in (items[6], *items[:6])]
    reader = BkpReader(path)
    try:
        assert len(reader.pages) == 3 and len(reader.manifest.instances) == 1
        attributes = [(a.level, a.uid) for a in reader.manifest.attributes]
        assert attributes == [("instance", first.instance.sop_uid)]
    finally:
        reader.close()


# ---------------------------------------------------------------------- 6. compatibility


def _raw_manifest(path: Path) -> dict:
    data = path.read_bytes()
    moff = int.from_bytes(data[-FOOTER.size:-FOOTER.size + 8], "little")
    _type, codec, _seq, stored, raw, _check = layout.unpack_frame_header(data[moff:moff + FRAME.size], moff)
    payload = data[moff + FRAME.size:moff + FRAME.size + stored]
    content = zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw) if codec == 1 else payload
    decoded = msgspec.msgpack.decode(content)
    assert isinstance(decoded, dict)
    return decoded


def test_a_file_without_pages_looks_like_a_1_0_file(corpus: Corpus, tmp_path: Path) -> None:
    b = Builder(tmp_path / "synthetic.bkp")
    b.patients, b.studies, b.series = hierarchy(1, 1, 1)
    b.instance(uid(9, 1), b.series[0].series_uid, b"DICM" * 100)
    synthetic = b.finish()
    for path in (corpus.plain, synthetic):
        m = _raw_manifest(path)
        assert "pages" not in m, path
        assert FEATURE_PAGES not in m["required_features"], path
        reader = BkpReader(path)
        try:
            assert reader.pages == [] and reader.instance_count == len(reader.manifest.instances) > 0
        finally:
            reader.close()
        assert not any(ftype == FRAME_PAGE for ftype in _frame_types(path)), path
    # the paged file, for contrast
    m = _raw_manifest(corpus.paged)
    assert len(m["pages"]) > 1 and FEATURE_PAGES in m["required_features"]
    assert FRAME_PAGE in _frame_types(corpus.paged)


def _frame_types(path: Path) -> list[int]:
    data = path.read_bytes()
    moff = int.from_bytes(data[-FOOTER.size:-FOOTER.size + 8], "little")
    at, types = 64, []
    while at < moff:
        ftype, _codec, _seq, stored, _raw, _check = layout.unpack_frame_header(data[at:at + FRAME.size], at)
        types.append(ftype)
        at += FRAME.size + stored
    return types


def test_a_reader_without_the_feature_reads_plain_files_and_refuses_paged_ones(
        corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a reader that predates pages does: it reads a file without pages in full,
    and refuses a paged one (rather than take the manifest's tail for everything)."""
    monkeypatch.setattr(reader_module, "KNOWN_FEATURES", KNOWN_FEATURES - {FEATURE_PAGES})
    assert set(_shas(corpus.plain)) == set(corpus.cat["instances"])
    with pytest.raises(UnsupportedFeatureError, match=FEATURE_PAGES):
        BkpReader(corpus.paged)



# ---------------------------------------------------------------------- found by a break-it round


def test_attributes_of_paged_instances_do_not_read_pages_back(corpus: Corpus, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether the file holds an instance is known without reading pages back (it once read
    them from the first for every instance attribute: minutes for 5,000 attributes)."""
    monkeypatch.setattr(bkp_plugin, "PAGE_ENTRIES", PAGE)
    target = bkp_plugin.BkpTarget(str(tmp_path / "t.bkp"))
    try:
        (p,), (st,), (se,) = hierarchy(1, 1, 1)
        items = [Item(InstanceRecord(sop_uid=uid(9, i), series_uid=se.series_uid), se, st, p,
                      lambda: io.BytesIO(b"abc"))
                 for i in range(5 * PAGE)]
        for it in items:
            assert target.put_instance(it, ConflictPolicy.SKIP)[0] is Outcome.STORED
        assert target.writer.pages, "the entries must be in pages by now"

        def no_reads() -> None:
            raise AssertionError("pages were read back")

        monkeypatch.setattr(target.writer, "written_entries", no_reads)
        for it in items:
            attrs = Attributes(level="instance", uid=it.instance.sop_uid, comment="c")
            assert target.put_attributes(attrs, ConflictPolicy.SKIP)[0] is Outcome.STORED
        unknown = Attributes(level="instance", uid=uid(9, 999), comment="c")
        assert target.put_attributes(unknown, ConflictPolicy.SKIP)[0] is Outcome.FAILED
        target.finish(True)
    except BaseException:
        target.finish(False)
        raise


def test_a_duplicate_without_a_checksum_is_compared_by_content(tmp_path: Path,  # type: ignore[no-untyped-def]
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A source that does not know the SHA-256 (a folder): the same UID again with other bytes
    is a conflict, with the same bytes unchanged, also once the first went into a page."""
    monkeypatch.setattr(bkp_plugin, "PAGE_ENTRIES", 2)
    (p,), (st,), (se,) = hierarchy(1, 1, 1)
    target = bkp_plugin.BkpTarget(str(tmp_path / "d.bkp"))

    def item(i: int, data: bytes) -> Item:
        return Item(InstanceRecord(sop_uid=uid(8, i), series_uid=se.series_uid), se, st, p,
                    lambda: io.BytesIO(data))

    try:
        for i in range(5):
            assert target.put_instance(item(i, b"first %d" % i), ConflictPolicy.SKIP)[0] is Outcome.STORED
        assert target.writer.pages
        assert target.put_instance(item(0, b"first 0"), ConflictPolicy.SKIP)[0] is Outcome.UNCHANGED
        assert target.put_instance(item(0, b"other"), ConflictPolicy.SKIP)[0] is Outcome.CONFLICT
        assert target.put_instance(item(4, b"other"), ConflictPolicy.SKIP)[0] is Outcome.CONFLICT
    finally:
        target.finish(False)


def test_salvage_scan_does_not_take_a_dicom_attachment_for_an_instance(  # type: ignore[no-untyped-def]
        cli, corpus: Corpus, pydicom_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "db"
    assert cli("--db", db, "-q", "import-db", corpus.plain).code == 0
    study = sorted(catalog(db)["studies"])[0]
    assert cli("--db", db, "attach", "--study", study, pydicom_files / "CT_small.dcm").code == 0
    monkeypatch.setattr(bkp_plugin, "PAGE_ENTRIES", PAGE)
    out = tmp_path / "a.bkp"
    assert cli("--db", db, "-q", "export-db", out, "--whole").code == 0
    reader = BkpReader(out)
    k = len(reader.pages) // 2
    page = reader.pages[k]
    reader.close()
    data = bytearray(out.read_bytes())
    data[page.offset + FRAME.size + page.stored // 2] ^= 0x01
    bad = tmp_path / "bad.bkp"
    bad.write_bytes(bytes(data))
    rescued = tmp_path / "rescued.bkp"
    res = cli("bkp", "salvage", bad, rescued, "--json")
    assert res.code == EXIT_PARTIAL, res.out
    assert set(_entries(rescued)) <= set(_entries(out)), "an attachment came back as an instance"


def test_scan_salvage_keeps_an_instance_across_a_damaged_page_header(corpus: Corpus, tmp_path: Path) -> None:
    """Without footer and manifest, a page frame between two consecutive data frames whose
    header is damaged costs nothing: the data frames' seq numbers show nothing is missing."""
    from dicomvault.formats.bkp.salvage import salvage

    data = corpus.paged.read_bytes()
    reader = BkpReader(corpus.paged)
    try:
        frames = reader.manifest.frames
        between = [p for p in reader.pages if frames[0].offset < p.offset < frames[-1].offset]
    finally:
        reader.close()
    assert between, "the paged corpus must have pages between data frames"
    cut = data[:-10]  # no footer: salvage scans
    base = salvage_path = tmp_path / "cut.bkp"
    base.write_bytes(cut)
    broken = bytearray(cut)
    for p in between:
        broken[p.offset + 20] ^= 0xFF  # the page's frame header (its seq): no longer a valid frame
    damaged = tmp_path / "broken.bkp"
    damaged.write_bytes(bytes(broken))
    one = salvage(salvage_path, tmp_path / "one.bkp")
    two = salvage(damaged, tmp_path / "two.bkp")
    assert two.instances_recovered == one.instances_recovered > 0
    assert _entries(tmp_path / "two.bkp").keys() == _entries(tmp_path / "one.bkp").keys()


def test_validate_reads_pages_even_when_the_manifest_has_other_faults(corpus: Corpus, tmp_path: Path) -> None:
    from dicomvault.formats.bkp.validate import validate

    data = corpus.paged.read_bytes()
    reader = BkpReader(corpus.paged)
    page = reader.pages[1]
    reader.close()
    damaged = bytearray(data)
    damaged[page.offset + FRAME.size + page.stored // 2] ^= 0x01

    def out_of_bounds(m: dict) -> None:  # the manifest's own first instance points past the stream
        m["instances"][0]["blob"][0] = 10**12

    path = tmp_path / "two-faults.bkp"
    path.write_bytes(reseal_manifest(bytes(damaged), out_of_bounds))
    codes = {f.code for f in validate(path).findings}
    assert {"blob.bounds", "page.checksum"} <= codes, codes
