"""Volume sets (SPEC.md section 15): ``export-db --volume-size`` on the real
DICOM shipped with pydicom, each volume checked on its own, the whole set
restored and compared with the source database, and incomplete or mixed
sets refused with the offending file named."""
from __future__ import annotations

import hashlib
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import zstandard

from dicomvault.engine import UnsupportedFeatureError, VolumeSetError
from dicomvault.formats.bkp import manifest as manifest_module
from dicomvault.formats.bkp import reader as reader_module
from dicomvault.formats.bkp import volumes
from dicomvault.formats.bkp.layout import FOOTER, FRAME, unpack_footer, unpack_frame_header
from dicomvault.formats.bkp.manifest import Volume
from dicomvault.formats.bkp.reader import BkpReader
from dicomvault.formats.bkp.volumes import FAT32_LIMIT, open_backup, parse_size
from test_roundtrip import catalog, check_consistent, run

VOLUME_SIZE = 400_000  # the largest pydicom test file is 321,700 bytes


@dataclass
class VolumeCorpus:
    db: Path
    folder: Path  # holds set.001.bkp, set.002.bkp, ...
    volumes: list[Path]
    series: str  # a series with instances in exactly one volume
    study_attachment: bytes


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, pydicom_files: Path) -> VolumeCorpus:
    root = tmp_path_factory.mktemp("volumes")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DICOMVAULT_DB", str(root / "default-db"))
        mp.setenv("DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD", "1")
        db = root / "db"
        charset = pydicom_files.parent / "charset_files"
        ingest = run("--db", db, "import-dicom", pydicom_files, charset, "--json")
        assert ingest.json()["counts"]["instance"]["stored"] > 100, ingest.err
        cat = catalog(db)
        study = sorted(cat["studies"])[0]
        series = sorted(se for se, row in cat["series"].items() if row[1] == study)[0]
        instance = sorted(u for u, row in cat["instances"].items() if row[1] == series)[0]
        patient = cat["studies"][study][1]
        patient_id = cat["patients"][patient][1]
        files = root / "attachments"
        files.mkdir()
        blob = random.Random(7).randbytes(150_000)  # incompressible: it takes real room in a volume
        (files / "scan.pdf").write_bytes(blob)
        (files / "voi.csv").write_bytes(b"roi,ml\n1,12.5\n")
        steps: list[tuple[object, ...]] = [
            ("annotate", "--study", study, "--comment", "baseline", "--tag", "qc"),
            ("annotate", "--series", series, "--field", "frames=1"),
            ("annotate", "--instance", instance, "--comment", "key image"),
            ("attach", files / "scan.pdf", "--study", study),
            ("attach", files / "voi.csv", "--series", series)]
        if patient_id:
            steps.append(("annotate", "--patient", patient_id, "--tag", "cohort-a"))
        for step in steps:
            res = run("--db", db, *step)
            assert res.code == 0, (step, res.err)
        folder = root / "out"
        folder.mkdir()
        res = run("--db", db, "export-db", folder / "set.bkp", "--whole", "--volume-size", "400K", "--json")
        assert res.code == 0, res.err
        vols = sorted(folder.iterdir())
        assert [p.name for p in vols] == [f"set.{i:03d}.bkp" for i in range(1, len(vols) + 1)]
        assert res.json()["details"]["volumes"] == [str(p) for p in vols]
        # a series whose instances are all in one volume, and not the first volume
        where: dict[str, set[int]] = {}
        for i, p in enumerate(vols, 1):
            r = BkpReader(p)
            for e in r.manifest.instances:
                where.setdefault(e.record.series_uid, set()).add(i)
            r.close()
        alone = sorted(s for s, v in where.items() if v == {2})
        assert alone
    return VolumeCorpus(db=db, folder=folder, volumes=vols, series=alone[0], study_attachment=blob)


def copy_set(corpus: VolumeCorpus, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(corpus.folder, folder)
    return folder


def error_line(res) -> str:  # type: ignore[no-untyped-def]
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("dicomvault: error: "), res.err
    assert "Traceback" not in res.err
    return lines[-1]


# ---------------------------------------------------------------------- writing


def test_several_volumes_each_complete_and_within_the_size(corpus: VolumeCorpus) -> None:
    assert len(corpus.volumes) >= 3
    set_ids = set()
    everything: list[str] = []
    for i, path in enumerate(corpus.volumes, 1):
        assert path.stat().st_size <= VOLUME_SIZE
        reader = BkpReader(path)  # opens and lists on its own
        try:
            m = reader.manifest
            assert m.required_features == ["volumes"]
            assert isinstance(m.volume, Volume)
            assert (m.volume.index, m.volume.last) == (i, i == len(corpus.volumes))
            assert len(m.volume.set_id) == 32 and int(m.volume.set_id, 16) >= 0
            set_ids.add(m.volume.set_id)
            # full verification of this volume alone: every frame, every blob's SHA-256
            for f in range(len(m.frames)):
                reader.read_frame(f)
            for e in [*m.instances, *m.attachments]:
                with reader.open_blob(e.blob) as fh:
                    assert hashlib.sha256(fh.read()).hexdigest() == e.record.sha256
            # every instance's hierarchy is in its own volume
            series = {s.series_uid: s for s in m.series}
            studies = {s.study_uid: s for s in m.studies}
            patients = {p.key for p in m.patients}
            for e in m.instances:
                assert studies[series[e.record.series_uid].study_uid].patient_key in patients
            for a in m.attachments:
                owners = {"patient": patients, "study": studies, "series": series}
                assert a.record.uid in owners[a.record.level]
            everything += [e.record.sop_uid for e in m.instances]
        finally:
            reader.close()
    assert len(set_ids) == 1
    assert len(everything) == len(set(everything)) == len(catalog(corpus.db)["instances"])
    # the volumes are reasonably full (the next instance, up to 321,700 bytes, counts raw), not one
    # instance each
    assert sum(p.stat().st_size for p in corpus.volumes[:-1]) > 0.4 * VOLUME_SIZE * (len(corpus.volumes) - 1)


def test_each_volume_validates_and_verifies_on_its_own(cli, corpus: VolumeCorpus) -> None:
    """``bkp validate`` (structure, schema, the references of SPEC.md 8.6) and ``bkp verify``
    (every frame, every SHA-256) pass on every volume alone: each carries the records and the
    attributes of what it holds, the attributes of an instance included."""
    placed: dict[tuple[str, str], int] = {}
    for path in corpus.volumes:
        for tool in ("validate", "verify"):
            res = cli("bkp", tool, path)
            assert res.code == 0, (tool, path.name, res.out, res.err)
        reader = BkpReader(path)
        for a in reader.manifest.attributes:
            placed[(a.level, a.uid)] = placed.get((a.level, a.uid), 0) + 1
        reader.close()
    source = catalog(corpus.db)["attributes"]
    assert set(placed) == set(source)
    assert any(level == "instance" for level, _uid in placed)


@pytest.mark.parametrize("tool", ["inspect", "ls", "validate", "verify"])
def test_the_tools_given_the_set_name_say_what_to_do(cli, corpus: VolumeCorpus, tool: str) -> None:  # type: ignore[no-untyped-def]
    """``set.bkp`` does not exist, ``set.001.bkp`` does: the tools, which read
    one file, say that it names a volume set and how to use it."""
    res = cli("bkp", tool, corpus.folder / "set.bkp")
    assert res.code == 2, res.err
    assert "names a volume set" in res.err and "set.001.bkp" in res.err and "import-db" in res.err


def test_a_plain_export_has_no_volume_field(corpus: VolumeCorpus, tmp_path: Path) -> None:
    out = tmp_path / "plain.bkp"
    assert run("--db", corpus.db, "export-db", out, "--whole").code == 0
    data = out.read_bytes()
    moff, mlen, _n, _id = unpack_footer(data[-FOOTER.size:])
    _t, codec, _s, _stored, _raw, _c = unpack_frame_header(data[moff:moff + FRAME.size], moff)
    payload = data[moff + FRAME.size:moff + mlen]
    decoded = msgspec.msgpack.decode(zstandard.ZstdDecompressor().decompress(payload) if codec else payload)
    assert "volume" not in decoded and decoded["required_features"] == []
    assert [p.name for p in tmp_path.iterdir()] == ["plain.bkp"]


def test_a_reader_without_the_feature_refuses_a_volume(corpus: VolumeCorpus,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomvault.formats.bkp import reader as reader_module

    monkeypatch.setattr(reader_module, "KNOWN_FEATURES", frozenset())
    assert "volumes" in manifest_module.KNOWN_FEATURES
    with pytest.raises(UnsupportedFeatureError, match="volumes"):
        BkpReader(corpus.volumes[1])


# ---------------------------------------------------------------------- reading the whole set


@pytest.mark.parametrize("name", ["set.001.bkp", "set.bkp", "last"])
def test_whole_set_round_trip(cli, corpus: VolumeCorpus, tmp_path: Path, name: str) -> None:
    given = corpus.volumes[-1] if name == "last" else corpus.folder / name
    restored = tmp_path / "restored"
    res = cli("--db", restored, "import-db", given, "--json")
    assert res.code == 0, res.err
    source = catalog(corpus.db)
    counts = res.json()["counts"]
    assert counts["instance"] == {"stored": len(source["instances"])}
    assert counts["attributes"] == {"stored": len(source["attributes"])}
    assert counts["attachment"] == {"stored": len(source["attachments"])}
    restored_catalog = catalog(restored)
    for part in source:
        assert restored_catalog[part] == source[part], part
    assert check_consistent(restored) == check_consistent(corpus.db)
    assert hashlib.sha256(corpus.study_attachment).hexdigest() in check_consistent(restored)
    res = cli("--db", corpus.db, "compare", given, "--whole", "--json")
    assert res.code == 0, res.err


def test_selective_restore_reads_only_the_volumes_that_hold_it(cli, corpus: VolumeCorpus, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    readers: list[BkpReader] = []

    class Recording(BkpReader):
        def __init__(self, path: object, passphrase: str | None = None) -> None:
            super().__init__(path, passphrase=passphrase)  # type: ignore[arg-type]
            readers.append(self)

    monkeypatch.setattr(reader_module, "BkpReader", Recording)  # what open_named opens
    restored = tmp_path / "restored"
    res = cli("--db", restored, "import-db", corpus.folder / "set.001.bkp", "--series", corpus.series,
              "--json")
    assert res.code == 0, res.err
    cat = catalog(restored)
    expected = {u for u, row in catalog(corpus.db)["instances"].items() if row[1] == corpus.series}
    assert set(cat["instances"]) == expected
    read: dict[str, int] = {}
    for r in readers:
        read[r.path.name] = read.get(r.path.name, 0) + r.bytes_read
    assert set(read) == {p.name for p in corpus.volumes}  # every manifest was checked ...
    # ... but frames were read only from the volume holding the series and the one holding its
    # attachment (written after all instances, so in the last volume)
    holders = {"set.002.bkp"}
    for p in corpus.volumes:
        r = BkpReader(p)
        if any(a.record.uid == corpus.series for a in r.manifest.attachments):
            holders.add(p.name)
        r.close()
    assert {name for name, n in read.items() if n} == holders


# ---------------------------------------------------------------------- incomplete and mixed sets


def test_missing_first_volume_is_named(cli, corpus: VolumeCorpus, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = copy_set(corpus, tmp_path)
    (folder / "set.001.bkp").unlink()
    res = cli("--db", tmp_path / "db", "import-db", folder / "set.bkp")
    assert res.code == 2 and "volume 1" in error_line(res) and "set.001.bkp" in error_line(res)
    res = cli("bkp", "inspect", folder / "set.bkp")
    assert res.code == 2 and "set.001.bkp, is missing" in res.err, res.err
    res = cli("bkp", "salvage", folder / "set.bkp", tmp_path / "out.bkp")
    assert res.code == 2 and "set.001.bkp, is missing" in res.err, res.err


def test_missing_middle_volume_is_named(cli, corpus: VolumeCorpus, tmp_path: Path) -> None:
    folder = copy_set(corpus, tmp_path)
    (folder / "set.002.bkp").unlink()
    res = cli("--db", tmp_path / "db", "import-db", folder / "set.001.bkp")
    assert res.code == 2
    assert "set.002.bkp" in error_line(res) and "missing" in error_line(res)
    assert not (tmp_path / "db").exists()
    with pytest.raises(VolumeSetError, match=r"set\.002\.bkp"):
        open_backup(folder / "set.003.bkp")


def test_missing_last_volume_is_detected(cli, corpus: VolumeCorpus, tmp_path: Path) -> None:
    folder = copy_set(corpus, tmp_path)
    k = len(corpus.volumes)
    (folder / f"set.{k:03d}.bkp").unlink()
    res = cli("--db", tmp_path / "db", "import-db", folder / "set.bkp")
    assert res.code == 2
    line = error_line(res)
    assert f"set.{k:03d}.bkp" in line and "last volume" in line and "missing" in line


def test_foreign_volume_is_named(cli, corpus: VolumeCorpus, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    res = run("--db", corpus.db, "export-db", other / "set.bkp", "--whole", "--volume-size", "400K")
    assert res.code == 0, res.err
    folder = copy_set(corpus, tmp_path)
    shutil.copy(other / "set.002.bkp", folder / "set.002.bkp")  # same name, same size, another export
    res = cli("--db", tmp_path / "db", "import-db", folder / "set.001.bkp")
    assert res.code == 2
    line = error_line(res)
    assert "set.002.bkp" in line and "another backup" in line
    # a stray volume of another set after the end is foreign too
    folder = copy_set(corpus, tmp_path / "2")
    k = len(corpus.volumes)
    shutil.copy(other / "set.001.bkp", folder / f"set.{k + 1:03d}.bkp")
    with pytest.raises(VolumeSetError, match=rf"set\.{k + 1:03d}\.bkp"):
        open_backup(folder / "set.001.bkp")
    # a plain backup named like a volume does not belong to the set either
    folder = copy_set(corpus, tmp_path / "3")
    assert run("--db", corpus.db, "export-db", folder / f"set.{k + 1:03d}.bkp", "--whole").code == 0
    with pytest.raises(VolumeSetError, match=rf"set\.{k + 1:03d}\.bkp is not a volume"):
        open_backup(folder / "set.002.bkp")


def test_renamed_volume_is_refused(corpus: VolumeCorpus, tmp_path: Path) -> None:
    folder = copy_set(corpus, tmp_path)
    (folder / "set.002.bkp").rename(folder / "renamed.bkp")
    with pytest.raises(VolumeSetError, match=r"renamed\.bkp is volume 2 of a set"):
        open_backup(folder / "renamed.bkp")
    (folder / "set.003.bkp").rename(folder / "set.002.bkp")
    with pytest.raises(VolumeSetError, match=r"set\.002\.bkp holds volume 3"):
        open_backup(folder / "set.001.bkp")


# ---------------------------------------------------------------------- failures leave nothing


def test_instance_larger_than_the_volume_size(cli, corpus: VolumeCorpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    res = cli("--db", corpus.db, "export-db", out / "small.bkp", "--whole", "--volume-size", "300K")
    assert res.code == 2
    biggest = max(catalog(corpus.db)["instances"].values(), key=lambda row: row[5])
    line = error_line(res)
    assert biggest[0] in line and "does not fit" in line and "--volume-size" in line
    assert list(out.iterdir()) == []


def test_volume_set_writer_refuses_a_blob_too_large(tmp_path: Path) -> None:
    from dicomvault.engine import PatientRecord

    w = volumes.VolumeSetWriter(tmp_path / "x.bkp", 100_000, writer="test")
    with pytest.raises(volumes.VolumeSizeError, match=r"instance 1\.2\.3"):
        w.place(size=200_000, cost=100, records=(PatientRecord(key="k"),), what="instance 1.2.3")
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_failed_export_midway_leaves_no_volume(cli, corpus: VolumeCorpus, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    real_close = volumes.VolumeSetWriter._close_volume
    seen: list[list[str]] = []

    def failing_close(self: volumes.VolumeSetWriter, last: bool) -> None:
        real_close(self, last)
        seen.append(sorted(p.name for p in out.iterdir()))
        if last:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(volumes.VolumeSetWriter, "_close_volume", failing_close)
    res = cli("--db", corpus.db, "export-db", out / "set.bkp", "--whole", "--volume-size", "400K")
    assert res.code == 2 and "No space left" in error_line(res)
    assert len(seen) >= 3 and all(n.startswith(".set.") and n.endswith(".part") for n in seen[-1])
    assert list(out.iterdir()) == []


def test_existing_volumes_are_kept_unless_forced(cli, corpus: VolumeCorpus, tmp_path: Path) -> None:
    folder = copy_set(corpus, tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    res = cli("--db", corpus.db, "export-db", folder / "set.bkp", "--whole", "--volume-size", "1M")
    assert res.code == 64 and "--force" in error_line(res)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    res = cli("--db", corpus.db, "export-db", folder / "set.bkp", "--whole", "--volume-size", "1M", "--force")
    assert res.code == 0, res.err
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) < len(before)  # the older, longer set's extra volumes are gone
    assert names == [f"set.{i:03d}.bkp" for i in range(1, len(names) + 1)]
    assert cli("--db", corpus.db, "compare", folder / "set.bkp", "--whole").code == 0


# ---------------------------------------------------------------------- sizes


@pytest.mark.parametrize(("text", "size"), [
    ("fat32", 4 * 1024**3 - 1), ("FAT32", FAT32_LIMIT), ("2G", 2_000_000_000), ("650M", 650_000_000),
    ("4700M", 4_700_000_000), ("1.5G", 1_500_000_000), ("2GiB", 2 * 1024**3), ("650MiB", 650 * 1024**2),
    ("200K", 200_000), ("200kb", 200_000), ("123456789", 123_456_789), ("2 GB", 2_000_000_000),
])
def test_sizes_parse(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "2X", "-1G", "1e9", "G", "1.2.3M", "2i", "1000"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_bad_size_on_the_command_line(cli, corpus: VolumeCorpus, tmp_path: Path) -> None:
    res = cli("--db", corpus.db, "export-db", tmp_path / "x.bkp", "--whole", "--volume-size", "lots")
    assert res.code == 64 and "lots" in error_line(res)
    assert list(tmp_path.iterdir()) == []


def test_a_plain_file_of_the_same_name_is_replaced_only_when_forced(cli, corpus: VolumeCorpus,
                                                                    tmp_path: Path) -> None:
    plain = tmp_path / "set.bkp"
    assert cli("--db", corpus.db, "export-db", plain, "--whole").code == 0
    res = cli("--db", corpus.db, "export-db", plain, "--whole", "--volume-size", "1M")
    assert res.code == 64 and "set.bkp" in error_line(res) and "--force" in error_line(res)
    res = cli("--db", corpus.db, "export-db", plain, "--whole", "--volume-size", "1M", "--force")
    assert res.code == 0, res.err
    assert not plain.exists()  # else 'import-db set.bkp' would read it rather than the set
    assert len(open_backup(plain)) >= 2


def test_restoring_a_set_closes_the_volumes_it_is_done_with(corpus: VolumeCorpus,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomvault.engine import Item, Selection
    from dicomvault.plugins import bkp_plugin
    from dicomvault.plugins.bkp_plugin import BkpSource

    monkeypatch.setattr(bkp_plugin, "RELEASE_AFTER", 0)  # close a volume one item after leaving it
    source = BkpSource(str(corpus.volumes[0]))
    try:
        seen = 0
        for it in source.instances(Selection(whole=True)):
            assert isinstance(it, Item)
            with it.open() as fh:
                assert hashlib.sha256(fh.read()).hexdigest() == it.instance.sha256
            seen += 1
            assert sum(p._reader is not None for p in source.parts) <= 2
        assert seen == len(catalog(corpus.db)["instances"])
        assert all(p.opened for p in source.parts[:-1])
        # a late reader of a volume left behind (a worker thread) reopens it, and it closes again
        first = source.parts[0]
        assert first.manifest.instances == []  # a volume left behind keeps no entries in memory
        entry = next(first.instance_chunks())[0]  # reread from the file, which is closed again
        assert first._reader is None
        with first.open_blob(entry.blob) as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == entry.record.sha256
            assert first._reader is not None
        assert first._reader is None
    finally:
        source.close()
    assert all(p._reader is None for p in source.parts)


def test_the_target_alone_also_refuses_an_instance_too_large(corpus: VolumeCorpus, tmp_path: Path) -> None:
    """Without export-db's check beforehand (e.g. another caller of the engine), the set
    writer meets the instance, the run fails as a whole and no volume is kept."""
    from dicomvault.engine import Context, Hooks, Selection, make_plugin_manager, transfer

    ctx = Context(Hooks(make_plugin_manager(autoload=False)), str(corpus.db))
    ctx.volume_size = 300_000
    try:
        source = ctx.open_database().source()
        target = ctx.open_target(f"bkp:{tmp_path / 'x.bkp'}")
        with pytest.raises(volumes.VolumeSizeError, match="no volume was kept"):
            transfer(ctx, source, target, Selection(whole=True), operation="export-db")
        source.close()
    finally:
        ctx.close()
    assert list(tmp_path.iterdir()) == []


def test_an_encrypted_volume_set(cli, corpus: VolumeCorpus, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Every volume is an encrypted file of its own (own key frame and key, one passphrase),
    still within the volume size; the set restores with the passphrase and not without."""
    monkeypatch.setenv("DV_PASS", "correct horse battery staple")
    out = tmp_path / "out"
    out.mkdir()
    res = cli("--db", corpus.db, "export-db", out / "enc.bkp", "--whole", "--volume-size", "400K",
              "--encrypt", "--passphrase-env", "DV_PASS")
    assert res.code == 0, res.err
    vols = sorted(out.iterdir())
    assert len(vols) >= 3 and [p.name for p in vols] == [f"enc.{i:03d}.bkp" for i in range(1, len(vols) + 1)]
    for i, path in enumerate(vols, 1):
        assert path.stat().st_size <= VOLUME_SIZE
        reader = BkpReader(path, passphrase="correct horse battery staple")
        m = reader.manifest
        assert set(m.required_features) == {"volumes", "aes-256-gcm"}
        assert isinstance(m.volume, Volume) and (m.volume.index, m.volume.last) == (i, i == len(vols))
        reader.close()
    res = cli("--db", tmp_path / "no", "import-db", out / "enc.bkp")
    assert res.code != 0 and "passphrase" in error_line(res)
    restored = tmp_path / "restored"
    res = cli("--db", restored, "import-db", out / "enc.bkp", "--passphrase-env", "DV_PASS", "--json")
    assert res.code == 0, res.err
    source = catalog(corpus.db)
    restored_catalog = catalog(restored)
    for part in source:
        assert restored_catalog[part] == source[part], part
    assert check_consistent(restored) == check_consistent(corpus.db)
    # a truncated encrypted volume: no pointer at salvage, which does not scan encrypted files
    data = vols[1].read_bytes()
    vols[1].write_bytes(data[:len(data) // 2])
    res = cli("--db", tmp_path / "again", "import-db", out / "enc.bkp", "--passphrase-env", "DV_PASS")
    assert res.code == 2 and "truncated" in error_line(res) and "salvage" not in error_line(res)
