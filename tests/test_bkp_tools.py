"""``dicomvault bkp inspect|ls|validate|verify|salvage`` on real files:
the golden ones, a backup of pydicom's public test files, and damaged
copies of both."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from bkputil import repack, reseal_manifest
from dicomvault.formats.bkp.layout import FRAME, xxh3
from dicomvault.formats.bkp.reader import BkpReader
from dicomvault.formats.bkp.validate import validate, verify

V1 = Path(__file__).resolve().parent / "golden" / "bkp" / "v1"


@pytest.fixture(scope="module")
def real_backup(tmp_path_factory: pytest.TempPathFactory, pydicom_files: Path) -> Path:
    """pydicom's test files, exported and re-packed into 64 KiB frames."""
    from dicomvault.cli.main import main

    work = tmp_path_factory.mktemp("real")
    main(["--db", str(work / "db"), "-q", "import-dicom", str(pydicom_files)])
    assert main(["--db", str(work / "db"), "-q", "export-db", str(work / "whole.bkp"), "--whole"]) == 0
    return repack(work / "whole.bkp", work / "small-frames.bkp")  # type: ignore[no-any-return]


def _records(path: Path) -> dict[str, str]:
    reader = BkpReader(path)
    try:
        return {e.record.sop_uid: e.record.sha256 for e in reader.manifest.instances}
    finally:
        reader.close()


def test_inspect(cli) -> None:  # type: ignore[no-untyped-def]
    res = cli("bkp", "inspect", V1 / "basic.bkp", "--json")
    assert res.code == 0, res.err
    info = res.json()
    assert (info["version"], info["instances"], info["attachments"], info["patients"]) == ("1.0", 24, 2, 3)
    assert info["frames"] == 6 and info["payload_bytes"] > info["stored_bytes"] > 0
    text = cli("bkp", "inspect", V1 / "newer-minor.bkp")
    assert "1.3" in text.out and "thumbnails" in text.out


def test_ls_reads_only_the_manifest(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # every data frame damaged: listing still works, because it never reads them
    data = bytearray((V1 / "basic.bkp").read_bytes())
    reader = BkpReader(V1 / "basic.bkp")
    for fe in reader.manifest.frames:
        data[fe.offset + FRAME.size] ^= 0xFF
    reader.close()
    damaged = tmp_path / "damaged.bkp"
    damaged.write_bytes(bytes(data))
    res = cli("bkp", "ls", damaged, "--json", "--level", "instance")
    assert res.code == 0, res.err
    tree = res.json()
    assert len(tree) == 3
    sops = [i["sop_uid"] for p in tree for st in p["studies"] for se in st["series"] for i in se["items"]]
    assert sorted(sops) == sorted(_records(V1 / "basic.bkp"))
    assert "STUDY" in cli("bkp", "ls", damaged).out


def test_validate_and_verify_exit_codes(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert cli("bkp", "validate", V1 / "basic.bkp").code == 0
    assert cli("bkp", "verify", V1 / "basic.bkp").code == 0
    # a damaged data frame: the structure is fine, the content is not
    bad = V1 / "negative" / "checksum-mismatch.bkp"
    assert cli("bkp", "validate", bad).code == 0
    res = cli("bkp", "verify", bad, "--json")
    assert res.code == 1
    codes = {f["code"] for f in res.json()["findings"]}
    assert codes == {"frame.checksum", "blob.unreadable"}
    # not a .bkp at all
    res = cli("bkp", "validate", V1 / "negative" / "bad-magic.bkp", "--json")
    assert res.code == 2 and res.json()["findings"][0]["code"] == "header.magic"
    assert cli("bkp", "verify", tmp_path / "missing.bkp").code != 0


def _rewrite(src: Path, dst: Path, patch) -> Path:  # type: ignore[no-untyped-def]
    data = bytearray(src.read_bytes())
    patch(data)
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("case, code", [
    ("critical-frame", "frame.critical-unknown"),
    ("gap", "layout.chain"),
    ("reserved", "frame.reserved"),
    ("footer-count", "footer.checksum"),
])
def test_validate_names_structural_damage(tmp_path: Path, case: str, code: str) -> None:
    src = V1 / "basic.bkp"
    reader = BkpReader(src)
    frames = reader.manifest.frames
    reader.close()
    out = tmp_path / f"{case}.bkp"
    if case == "critical-frame":
        # turn data frame 2 into an unknown *critical* frame type 0x10 (header resealed)
        def patch(d: bytearray) -> None:
            at = frames[2].offset
            d[at + 4] = 0x10
            d[at + 40:at + 48] = struct.pack("<Q", xxh3(bytes(d[at:at + 40])))
    elif case == "gap":
        def patch(d: bytearray) -> None:
            d[frames[3].offset:frames[3].offset + 4] = b"XXXX"
    elif case == "reserved":
        def patch(d: bytearray) -> None:
            at = frames[1].offset
            d[at + 6] = 1
            d[at + 40:at + 48] = struct.pack("<Q", xxh3(bytes(d[at:at + 40])))
    else:
        def patch(d: bytearray) -> None:
            d[-48] ^= 1
    result = validate(_rewrite(src, out, patch))
    assert not result.valid
    assert code in {f.code for f in result.findings}, result.findings


def test_validate_checks_consistency_rules(tmp_path: Path) -> None:
    """SPEC.md section 8.6: duplicates, dangling references, sizes."""
    def edit(m: dict) -> None:
        m["instances"].append(m["instances"][0])  # duplicate SOP Instance UID
        m["series"][0]["study_uid"] = "2.25.999"  # dangling
        m["instances"][1]["record"]["size"] += 1  # size differs from blob length
        m["attributes"].append({"level": "study", "uid": "2.25.998"})  # nobody's attributes

    out = tmp_path / "inconsistent.bkp"
    out.write_bytes(reseal_manifest((V1 / "basic.bkp").read_bytes(), edit))
    codes = [f.code for f in validate(out).findings]
    assert codes.count("record.duplicate") == 1
    assert codes.count("record.dangling") == 2
    assert "blob.size" in codes


def test_a_frame_type_of_a_later_version_is_skipped_when_not_critical(tmp_path: Path) -> None:
    result = verify(V1 / "newer-minor.bkp")
    assert result.valid
    unknown = [f for f in result.findings if f.code == "frame.unknown"]
    assert len(unknown) == 1 and unknown[0].severity == "info"


# ------------------------------------------------------------------ salvage
def test_salvage_with_the_manifest_keeps_records_attributes_attachments(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "rescued.bkp"
    res = cli("bkp", "salvage", V1 / "negative" / "checksum-mismatch.bkp", out, "--json")
    assert res.code == 1  # something was lost
    report = res.json()
    assert report["method"] == "manifest" and report["verified"]
    original = _records(V1 / "basic.bkp")
    rescued = _records(out)
    lost = {line.split()[1].rstrip(":") for line in report["lost"]}
    assert rescued.keys() | lost == original.keys() and not rescued.keys() & lost
    assert 0 < len(lost) <= 8  # one 4 KiB frame of small instances
    assert all(original[uid] == sha for uid, sha in rescued.items())
    assert verify(out).valid
    reader = BkpReader(out)
    assert len(reader.manifest.attachments) == 2 and len(reader.manifest.attributes) == 4
    reader.close()
    # the rescued file restores like any other
    db = tmp_path / "db"
    assert cli("--db", db, "-q", "import-db", out).code == 0


def test_salvage_of_an_intact_file_is_complete(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "copy.bkp"
    assert cli("bkp", "salvage", V1 / "basic.bkp", out).code == 0
    assert _records(out) == _records(V1 / "basic.bkp")
    assert cli("bkp", "salvage", V1 / "basic.bkp", out).code != 0  # never replaces a file


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.9])
def test_salvage_of_a_truncated_file_recovers_intact_instances(  # type: ignore[no-untyped-def]
        cli, tmp_path: Path, real_backup: Path, fraction: float) -> None:
    data = real_backup.read_bytes()
    cut = tmp_path / "cut.bkp"
    cut.write_bytes(data[:int(len(data) * fraction)])
    out = tmp_path / "rescued.bkp"
    restore = cli("--db", tmp_path / "db", "import-db", cut)
    assert restore.code == 2 and "truncated" in restore.err and "bkp salvage" in restore.err
    res = cli("bkp", "salvage", cut, out, "--json")
    assert res.code == 1
    report = res.json()
    assert report["method"] == "scan" and not report["verified"]
    assert report["instances_lost"] is None  # unknowable without the manifest: not 0
    original = _records(real_backup)
    rescued = _records(out)
    assert rescued, "a truncated file still holds intact instances"
    # every rescued instance is byte-identical to the original: nothing half or glued
    assert all(original.get(uid) == sha for uid, sha in rescued.items()), \
        [uid for uid, sha in rescued.items() if original.get(uid) != sha]
    assert verify(out).valid


def test_salvage_skips_a_damaged_frame_in_the_middle_without_manifest(  # type: ignore[no-untyped-def]
        tmp_path: Path, real_backup: Path) -> None:
    from dicomvault.formats.bkp.salvage import salvage

    data = bytearray(real_backup.read_bytes())
    reader = BkpReader(real_backup)
    frames = reader.manifest.frames
    reader.close()
    mid = frames[len(frames) // 2]
    data[mid.offset + FRAME.size + 100] ^= 0xFF  # payload damaged
    bad_header = frames[len(frames) // 3]
    data[bad_header.offset + 10] ^= 0xFF  # header damaged: the scan must find the next frame
    data = data[:len(data) - 200]  # and the footer is gone
    src = tmp_path / "broken.bkp"
    src.write_bytes(bytes(data))
    result = salvage(src, tmp_path / "out.bkp")
    assert result.method == "scan" and result.frames_damaged >= 2
    original = _records(real_backup)
    rescued = _records(tmp_path / "out.bkp")
    assert len(rescued) > len(original) // 2
    assert all(original.get(uid) == sha for uid, sha in rescued.items())


def test_salvage_ignores_frames_of_later_versions(tmp_path: Path) -> None:
    from dicomvault.formats.bkp.salvage import salvage

    data = (V1 / "newer-minor.bkp").read_bytes()
    src = tmp_path / "cut.bkp"
    src.write_bytes(data[:-100])
    result = salvage(src, tmp_path / "out.bkp")
    rescued = _records(tmp_path / "out.bkp")
    original = _records(V1 / "basic.bkp")
    assert result.method == "scan" and len(rescued) == len(original)
    assert all(original[uid] == sha for uid, sha in rescued.items())



# ------------------------------------------------------------------ encrypted files
@pytest.fixture
def encrypted(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:  # type: ignore[no-untyped-def]
    """The golden basic file restored and exported again, encrypted."""
    monkeypatch.setenv("DV_PASS", "correct horse battery staple")
    monkeypatch.setenv("DV_WRONG", "wrong")
    db = tmp_path / "db"
    assert cli("--db", db, "-q", "import-db", V1 / "basic.bkp").code == 0
    out = tmp_path / "enc.bkp"
    res = cli("--db", db, "-q", "export-db", out, "--whole", "--encrypt", "--passphrase-env", "DV_PASS")
    assert res.code == 0, res.err
    return repack_encrypted(out, tmp_path / "enc-small.bkp")


def repack_encrypted(src: Path, dst: Path) -> Path:
    """``src`` with 4 KiB frames, still encrypted (so damage hits one frame)."""
    from dicomvault.formats.bkp.manifest import AttachmentEntry, InstanceEntry
    from dicomvault.formats.bkp.writer import BkpWriter

    reader = BkpReader(src, passphrase="correct horse battery staple")
    m = reader.manifest
    writer = BkpWriter(dst, writer="tests", frame_size=4096, passphrase="correct horse battery staple",
                       kdf_log2_n=10)
    inst = []
    for e in sorted(m.instances, key=lambda e: e.blob.offset):
        with reader.open_blob(e.blob) as fh:
            inst.append(InstanceEntry(e.record, writer.add_blob(fh)))
    att = []
    for a in m.attachments:
        with reader.open_blob(a.blob) as fh:
            att.append(AttachmentEntry(a.record, writer.add_blob(fh)))
    import msgspec
    writer.finish(msgspec.structs.replace(m, frames=[], instances=inst, attachments=att, created=""))
    reader.close()
    return dst


def test_tools_on_an_encrypted_file(cli, encrypted: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # without the passphrase: validate checks what needs no key, and says what it did not check
    res = cli("bkp", "validate", encrypted, "--json")
    assert res.code == 0, res.out
    codes = {f["code"] for f in res.json()["findings"]}
    assert codes == {"encrypted.unchecked"}
    assert cli("bkp", "ls", encrypted).code != 0  # needs the key, and says how to give it
    # with it: everything, as for a plain file
    res = cli("bkp", "verify", encrypted, "--json", "--passphrase-env", "DV_PASS")
    assert res.code == 0 and res.json()["findings"] == [], res.out
    info = cli("bkp", "inspect", encrypted, "--json", "--passphrase-env", "DV_PASS").json()
    assert info["encrypted"] and info["instances"] == 24
    assert cli("bkp", "ls", encrypted, "--passphrase-env", "DV_PASS").code == 0
    wrong = cli("bkp", "verify", encrypted, "--json", "--passphrase-env", "DV_WRONG")
    assert wrong.code != 0
    # a damaged encrypted frame: verify names it; salvage recovers the rest, encrypted again
    data = bytearray(encrypted.read_bytes())
    reader = BkpReader(encrypted, passphrase="correct horse battery staple")
    fe = reader.manifest.frames[1]
    reader.close()
    data[fe.offset + FRAME.size + 5] ^= 1
    xxh = xxh3(bytes(data[fe.offset + FRAME.size:fe.offset + FRAME.size + fe.stored]))
    data[fe.offset + 32:fe.offset + 40] = struct.pack("<Q", xxh)  # checksum resealed: only GCM can tell
    head = bytes(data[fe.offset:fe.offset + 40])
    data[fe.offset + 40:fe.offset + 48] = struct.pack("<Q", xxh3(head))
    damaged = tmp_path / "damaged.bkp"
    damaged.write_bytes(bytes(data))
    res = cli("bkp", "verify", damaged, "--json", "--passphrase-env", "DV_PASS")
    assert res.code == 1 and "frame.checksum" in {f["code"] for f in res.json()["findings"]}
    # without the passphrase verify still checks every frame checksum: intact file good, a flipped
    # byte (checksum not resealed) found
    sealed = cli("bkp", "verify", encrypted, "--json")
    assert sealed.code == 0 and sealed.json()["bytes_verified"] > 0, sealed.out
    flipped = bytearray(encrypted.read_bytes())
    flipped[fe.offset + FRAME.size + 5] ^= 1
    raw_damage = tmp_path / "raw-damage.bkp"
    raw_damage.write_bytes(bytes(flipped))
    res = cli("bkp", "verify", raw_damage, "--json")
    assert res.code == 1 and "frame.checksum" in {f["code"] for f in res.json()["findings"]}
    out = tmp_path / "rescued.bkp"
    res = cli("bkp", "salvage", damaged, out, "--json", "--passphrase-env", "DV_PASS")
    assert res.code == 1 and res.json()["instances_recovered"] > 0
    rescued = BkpReader(out, passphrase="correct horse battery staple")
    assert rescued.encrypted
    rescued.close()
    assert b"GOLD-001" not in out.read_bytes()


def test_salvage_by_scanning_names_a_deflated_file_whose_end_is_unknown(  # type: ignore[no-untyped-def]
        cli, tmp_path: Path, pydicom_files: Path) -> None:
    """A deflated data set has no element lengths to walk, and bytes may follow its deflate
    stream: without the manifest its end cannot be told from the attachment that follows it
    in the payload. Salvage keeps it whole and names it as one to check."""
    db = tmp_path / "db"
    assert cli("--db", db, "-q", "import-dicom", pydicom_files / "image_dfl.dcm").code == 0
    study = cli("--db", db, "--json", "ls", "--level", "study").json()[0]["children"][0]["uid"]
    extra = tmp_path / "notes.bin"
    extra.write_bytes(bytes(range(256)) * 400)
    assert cli("--db", db, "-q", "attach", "--study", study, extra).code == 0
    whole = tmp_path / "whole.bkp"
    assert cli("--db", db, "-q", "export-db", whole, "--whole").code == 0
    cut = tmp_path / "cut.bkp"
    cut.write_bytes(whole.read_bytes()[:-100])  # the footer is gone: salvage must scan
    out = tmp_path / "out.bkp"
    res = cli("bkp", "salvage", cut, out, "--json")
    report = res.json()
    assert report["method"] == "scan" and not report["verified"]
    (uid,) = _records(whole)
    assert set(_records(out)) == {uid}
    assert any(uid in note and "check it" in note for note in report["notes"])


@pytest.mark.parametrize("command", ["inspect", "ls", "validate", "verify"])
def test_a_missing_file_fails_alike_in_every_tool(cli, tmp_path: Path, command: str) -> None:  # type: ignore[no-untyped-def]
    res = cli("bkp", command, tmp_path / "missing.bkp")
    assert res.code == 2 and "cannot open" in res.err and "missing.bkp" in res.err, res.err
