"""Encryption at rest of .bkp files (SPEC.md section 17): round trips with
each passphrase source, wrong and missing passphrases, no patient data in
the bytes of an encrypted file, tampering, and selective restore."""
from __future__ import annotations

import contextlib
import getpass
import hashlib
import io
import json
import os
import sqlite3
import struct
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from dicomvault.cli.main import main
from dicomvault.engine import (
    EXIT_USAGE,
    ChecksumError,
    PassphraseRequiredError,
    TruncatedError,
    UnsupportedFeatureError,
    WrongPassphraseError,
)
from dicomvault.engine import passphrase as passphrase_mod
from dicomvault.formats.bkp import crypto
from dicomvault.formats.bkp.layout import (
    FLAG_ENCRYPTED,
    FOOTER,
    FRAME,
    FRAME_DATA,
    FRAME_KEY,
    HEADER,
    pack_frame_header,
    unpack_frame_header,
    xxh3,
)
from dicomvault.formats.bkp.manifest import Manifest, encoder
from dicomvault.formats.bkp.reader import BkpReader
from dicomvault.formats.bkp.writer import BkpWriter

PASSPHRASE = "correct horse battery staple ✓"
SMALL_FILES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtdose.dcm", "JPEG2000.dcm")


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> dict:
        return json.loads(self.out)


def run(*args: object) -> Run:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return Run(code, out.getvalue(), err.getvalue())


def stored(db: Path) -> dict[str, str]:
    """SOP Instance UID -> SHA-256, from the catalog ({} when there is no database)."""
    if not (db / "catalog.sqlite").exists():
        return {}
    with contextlib.closing(sqlite3.connect(db / "catalog.sqlite")) as conn:
        return dict(conn.execute("SELECT sop_uid, sha256 FROM instances"))


@dataclass
class Corpus:
    db: Path
    files: list[Path]
    plain: Path  # unencrypted export of the whole database
    encrypted: Path  # the same, encrypted with PASSPHRASE
    instances: dict[str, str]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, real_dicom: list[str]) -> Corpus:
    root = tmp_path_factory.mktemp("crypto")
    test_files = Path(next(f for f in real_dicom if f.endswith("test_files")))
    charset = Path(next(f for f in real_dicom if f.endswith("charset_files")))
    files = [test_files / n for n in SMALL_FILES] + sorted(p for p in charset.iterdir() if p.suffix == ".dcm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DICOMVAULT_DB", str(root / "default-db"))
        mp.setenv("DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD", "1")
        mp.setenv("DV_TEST_PASSPHRASE", PASSPHRASE)
        db = root / "db"
        res = run("--db", db, "import-dicom", *files, "--json")
        assert res.json()["counts"]["instance"]["stored"] >= 15, res.err
        plain, encrypted = root / "plain.bkp", root / "encrypted.bkp"
        assert run("--db", db, "export-db", plain, "--whole").code == 0
        res = run("--db", db, "export-db", encrypted, "--whole", "--encrypt",
                  "--passphrase-env", "DV_TEST_PASSPHRASE")
        assert res.code == 0, res.err
    return Corpus(db=db, files=files, plain=plain, encrypted=encrypted, instances=stored(db))


# ---------------------------------------------------------------------- round trips


def test_round_trip_with_the_passphrase_in_an_environment_variable(
        corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DV_PASS", PASSPHRASE)
    db = tmp_path / "restored"
    res = run("--db", db, "import-db", corpus.encrypted, "--passphrase-env", "DV_PASS")
    assert res.code == 0, res.err
    assert stored(db) == corpus.instances


def test_round_trip_with_the_passphrase_in_a_file(corpus: Corpus, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("another passphrase\n", encoding="utf-8")
    bkp = tmp_path / "out.bkp"
    assert run("--db", corpus.db, "export-db", bkp, "--whole", "--encrypt",
               "--passphrase-file", secret).code == 0
    reader = BkpReader(bkp, passphrase="another passphrase")  # the trailing newline is not part of it
    assert reader.encrypted and "aes-256-gcm" in reader.manifest.required_features
    reader.close()
    db = tmp_path / "restored"
    res = run("--db", db, "import-db", bkp, "--passphrase-file", secret)
    assert res.code == 0, res.err
    assert stored(db) == corpus.instances


def test_round_trip_with_the_passphrase_asked_at_a_prompt(
        corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return "typed at the prompt"

    monkeypatch.setattr(getpass, "getpass", fake_getpass)
    monkeypatch.setattr(passphrase_mod, "_interactive", lambda: True)
    bkp = tmp_path / "out.bkp"
    res = run("--db", corpus.db, "export-db", bkp, "--whole", "--encrypt")
    assert res.code == 0, res.err
    assert len(prompts) == 2, "asked twice when encrypting"
    assert "typed at the prompt" not in res.out + res.err
    prompts.clear()
    db = tmp_path / "restored"
    res = run("--db", db, "import-db", bkp)
    assert res.code == 0, res.err
    assert len(prompts) == 1, "asked once when decrypting"
    assert stored(db) == corpus.instances


def test_two_different_passphrases_at_the_prompt_write_nothing(
        corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter(["first", "second"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    monkeypatch.setattr(passphrase_mod, "_interactive", lambda: True)
    res = run("--db", corpus.db, "export-db", tmp_path / "out.bkp", "--whole", "--encrypt")
    assert res.code == EXIT_USAGE and "differ" in res.err
    assert list(tmp_path.iterdir()) == []


def test_encrypt_without_a_passphrase_and_without_a_terminal_is_refused(corpus: Corpus,
                                                                        tmp_path: Path) -> None:
    res = run("--db", corpus.db, "export-db", tmp_path / "out.bkp", "--whole", "--encrypt")
    assert res.code == EXIT_USAGE
    assert "--passphrase-env" in res.err and "Traceback" not in res.err
    assert list(tmp_path.iterdir()) == []


def test_a_passphrase_without_encrypt_is_refused(corpus: Corpus, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DV_PASS", PASSPHRASE)
    res = run("--db", corpus.db, "export-db", tmp_path / "out.bkp", "--whole", "--passphrase-env", "DV_PASS")
    assert res.code == EXIT_USAGE and "--encrypt" in res.err
    assert list(tmp_path.iterdir()) == []


def test_an_unset_passphrase_variable_is_a_usage_error(corpus: Corpus, tmp_path: Path) -> None:
    res = run("--db", tmp_path / "db", "import-db", corpus.encrypted, "--passphrase-env", "DV_NOT_SET")
    assert res.code == EXIT_USAGE and "DV_NOT_SET" in res.err


# ---------------------------------------------------------------------- wrong or missing passphrase


def test_wrong_passphrase_gives_a_clear_error_and_imports_nothing(
        corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DV_PASS", "not the passphrase")
    db = tmp_path / "restored"
    res = run("--db", db, "import-db", corpus.encrypted, "--passphrase-env", "DV_PASS")
    assert res.code != 0
    assert "wrong passphrase" in res.err and "Traceback" not in res.err
    assert "not the passphrase" not in res.err
    assert stored(db) == {}
    with pytest.raises(WrongPassphraseError):
        BkpReader(corpus.encrypted, passphrase="not the passphrase")


def test_no_passphrase_says_the_file_is_encrypted_and_how_to_give_it(corpus: Corpus, tmp_path: Path) -> None:
    db = tmp_path / "restored"
    res = run("--db", db, "import-db", corpus.encrypted)
    assert res.code == EXIT_USAGE
    assert "encrypted" in res.err and "--passphrase-env" in res.err and "--passphrase-file" in res.err
    assert stored(db) == {}
    with pytest.raises(PassphraseRequiredError, match="encrypted"):
        BkpReader(corpus.encrypted)


def test_a_truncated_encrypted_file_is_truncated_before_any_passphrase_is_asked(
        corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cut = tmp_path / "cut.bkp"
    cut.write_bytes(corpus.encrypted.read_bytes()[:-100])
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": pytest.fail("asked for a passphrase"))
    monkeypatch.setattr(passphrase_mod, "_interactive", lambda: True)
    with pytest.raises(TruncatedError):
        BkpReader(cut)
    res = run("--db", tmp_path / "db", "import-db", cut)
    assert res.code != 0 and "truncated" in res.err
    assert "salvage" not in res.err  # salvage does not scan an encrypted file
    for command in (["inspect"], ["ls"]):
        res = run("bkp", *command, cut)
        assert res.code == 2 and "truncated" in res.err and "cut.bkp" in res.err, (command, res.err)
    # salvage: says why it cannot help, asks nothing, writes nothing
    res = run("bkp", "salvage", cut, tmp_path / "rescued.bkp")
    assert res.code == 2 and "truncated" in res.err and "cut.bkp" in res.err
    assert "encrypted file is salvaged only while its manifest reads" in res.err
    assert not (tmp_path / "rescued.bkp").exists()
    # with the passphrase given, the same errors, naming the file
    monkeypatch.setenv("DV_PASS", PASSPHRASE)
    res = run("bkp", "inspect", cut, "--passphrase-env", "DV_PASS")
    assert res.code == 2 and "truncated" in res.err and "cut.bkp" in res.err


def test_validate_and_verify_with_a_wrong_passphrase_do_not_call_the_file_invalid(
        corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DV_PASS", "not the passphrase")
    for command in ("validate", "verify"):
        res = run("bkp", command, corpus.encrypted, "--passphrase-env", "DV_PASS")
        assert res.code == 2, res.out
        assert "not checked" in res.out and "wrong passphrase" in res.out and "INVALID" not in res.out
        res = run("bkp", command, corpus.encrypted, "--passphrase-env", "DV_PASS", "--json")
        assert res.code == 2 and "key.passphrase" in {f["code"] for f in res.json()["findings"]}


def test_a_wrong_passphrase_names_the_file(corpus: Corpus, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DV_PASS", "not the passphrase")
    for argv in (["--db", tmp_path / "db", "import-db", corpus.encrypted],
                 ["bkp", "inspect", corpus.encrypted], ["bkp", "ls", corpus.encrypted]):
        res = run(*argv, "--passphrase-env", "DV_PASS")
        assert res.code == 2 and "wrong passphrase" in res.err and corpus.encrypted.name in res.err, res.err


def test_a_passphrase_file_with_a_windows_line_ending(corpus: Corpus, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(PASSPHRASE.encode("utf-8") + b"\r\n")
    res = run("--db", tmp_path / "db", "import-db", corpus.encrypted, "--passphrase-file", secret)
    assert res.code == 0, res.err
    assert stored(tmp_path / "db") == corpus.instances


def test_a_passphrase_for_a_file_that_is_not_encrypted_is_ignored(corpus: Corpus) -> None:
    reader = BkpReader(corpus.plain, passphrase="whatever")
    assert not reader.encrypted and reader.manifest.required_features == []
    reader.close()


# ---------------------------------------------------------------------- nothing leaks


def _identifying_values(files: list[Path], imported: dict[str, str]) -> set[bytes]:
    """Patient names and IDs (as stored in the DICOM files and as UTF-8) and
    the UIDs of the files that were imported; only values long enough not to
    occur by chance in random bytes."""
    values: set[bytes] = set()
    for f in files:
        if hashlib.sha256(f.read_bytes()).hexdigest() not in imported.values():
            continue  # not stored (broken, or another file has its UID)
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate",
                        "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            elem = ds.get_item(keyword)
            if elem is None or not elem.value:
                continue
            raw = elem.value if isinstance(elem.value, bytes) else str(elem.value).encode("latin-1", "ignore")
            value = ds.get(keyword)
            decoded = [str(v).encode("utf-8") for v in (value if isinstance(value, list) else [value])]
            for v in (raw.strip(b" \x00"), *decoded):
                values.add(v)
                values.update(part for part in v.split(b"^") if len(part) >= 6)
    return {v for v in values if len(v) >= 6}


def test_an_encrypted_file_contains_no_patient_names_ids_or_uids(corpus: Corpus) -> None:
    values = _identifying_values(corpus.files, corpus.instances)
    assert len(values) > 40
    # The plain file's content, decompressed, holds them: the test looks for what is really there.
    reader = BkpReader(corpus.plain)
    plain = b"".join(reader.read_frame(i) for i in range(len(reader.manifest.frames)))
    plain += encoder.encode(reader.manifest)
    reader.close()
    assert all(v in plain for v in values), sorted(v for v in values if v not in plain)
    data = corpus.encrypted.read_bytes()
    found = sorted(v for v in values if v in data)
    assert found == []
    for text in (b"dicomvault-bkp", b"DICM", b"1.2.840.10008"):  # no manifest, no DICOM header in clear
        assert text not in data
    # neither the header nor the footer carries anything but structure
    reader = BkpReader(corpus.encrypted, passphrase=PASSPHRASE)
    assert data[HEADER.size:HEADER.size + 5] == b"DVFR\x03"  # the key frame, right after the header
    assert data[12] == FLAG_ENCRYPTED and reader.encrypted
    reader.close()


# ---------------------------------------------------------------------- tampering


def _encrypted_file(path: Path, payload: bytes, passphrase: str = PASSPHRASE, frame_size: int = 4096) -> Path:
    w = BkpWriter(path, writer="test", passphrase=passphrase, frame_size=frame_size, kdf_log2_n=10)
    w.add_blob(io.BytesIO(payload))
    w.finish(Manifest(major=0, minor=0, writer="", created=""))
    return path


def _read_everything(path: Path, passphrase: str = PASSPHRASE) -> None:
    reader = BkpReader(path, passphrase=passphrase)
    try:
        for i in range(len(reader.manifest.frames)):
            reader.read_frame(i)
    finally:
        reader.close()


def _reseal_frame_header(data: bytearray, at: int) -> None:
    data[at + 40:at + 48] = struct.pack("<Q", xxh3(bytes(data[at:at + 40])))


def test_a_flipped_byte_in_an_encrypted_frame_is_a_checksum_error(corpus: Corpus, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    reader = BkpReader(corpus.encrypted, passphrase=PASSPHRASE)
    fe = reader.manifest.frames[0]
    reader.close()
    data = bytearray(corpus.encrypted.read_bytes())
    data[fe.offset + FRAME.size + 10] ^= 0x01
    damaged = tmp_path / "damaged.bkp"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="frame 0"):
        _read_everything(damaged)
    # ... and when the XXH3 is forged to match, AES-GCM's tag still catches it
    stored_len = unpack_frame_header(bytes(data[fe.offset:fe.offset + FRAME.size]), fe.offset)[3]
    payload = bytes(data[fe.offset + FRAME.size:fe.offset + FRAME.size + stored_len])
    data[fe.offset + 32:fe.offset + 40] = struct.pack("<Q", xxh3(payload))
    _reseal_frame_header(data, fe.offset)
    damaged.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="AES-GCM"):
        _read_everything(damaged)
    # the import names the damage and stores nothing bad; no raw cryptography exception escapes
    monkeypatch.setenv("DV_PASS", PASSPHRASE)
    res = run("--db", tmp_path / "db", "import-db", damaged, "--passphrase-env", "DV_PASS")
    assert "Traceback" not in res.err


def test_a_flipped_byte_in_the_encrypted_manifest_is_a_checksum_error(corpus: Corpus, tmp_path: Path) -> None:
    data = bytearray(corpus.encrypted.read_bytes())
    moff = struct.unpack("<Q", data[-FOOTER.size:-FOOTER.size + 8])[0]
    data[moff + FRAME.size + 3] ^= 0x80
    damaged = tmp_path / "damaged.bkp"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        BkpReader(damaged, passphrase=PASSPHRASE)


def test_frames_swapped_between_files_or_positions_fail(tmp_path: Path) -> None:
    payload = os.urandom(3 * 4096)  # incompressible: every frame is stored with codec 0, same length
    a = _encrypted_file(tmp_path / "a.bkp", payload)
    b = _encrypted_file(tmp_path / "b.bkp", payload)  # same passphrase, same content
    _read_everything(a)
    _read_everything(b)
    ra = BkpReader(a, passphrase=PASSPHRASE)
    frames = ra.manifest.frames
    ra.close()
    size = FRAME.size + frames[0].stored
    assert all(fe.stored == frames[0].stored for fe in frames)
    da, db = a.read_bytes(), b.read_bytes()
    # frame 1 of b, header and all, in place of frame 1 of a
    o = frames[1].offset
    swapped = tmp_path / "swapped.bkp"
    swapped.write_bytes(da[:o] + db[o:o + size] + da[o + size:])
    with pytest.raises(ChecksumError, match="frame 1"):
        _read_everything(swapped)
    # frames 0 and 1 of a exchanged, their seq fields fixed so that only the AAD can tell
    f0, f1 = bytearray(da[frames[0].offset:frames[0].offset + size]), bytearray(da[o:o + size])
    f0[8:16], f1[8:16] = struct.pack("<Q", 1), struct.pack("<Q", 0)
    _reseal_frame_header(f0, 0)
    _reseal_frame_header(f1, 0)
    moved = bytearray(da)
    moved[frames[0].offset:frames[0].offset + size] = f1
    moved[o:o + size] = f0
    swapped.write_bytes(bytes(moved))
    with pytest.raises(ChecksumError, match="frame 0"):
        _read_everything(swapped)


def test_an_unknown_header_flag_is_an_unsupported_feature(corpus: Corpus, tmp_path: Path) -> None:
    data = bytearray(corpus.plain.read_bytes())
    data[12:16] = struct.pack("<I", 1 << 5)
    data[56:64] = struct.pack("<Q", xxh3(bytes(data[:56])))
    path = tmp_path / "future.bkp"
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedFeatureError, match="bit 5"):
        BkpReader(path)


@pytest.mark.parametrize(("log2_n", "r", "p"), [(30, 8, 1), (20, 64, 1), (10, 8, 1000), (0, 8, 1)])
def test_absurd_kdf_parameters_are_refused_before_any_work(tmp_path: Path, log2_n: int, r: int,
                                                           p: int) -> None:
    path = _encrypted_file(tmp_path / "a.bkp", b"x" * 100)
    data = bytearray(path.read_bytes())
    key_at = HEADER.size + FRAME.size
    data[key_at + 2] = log2_n
    data[key_at + 4:key_at + 12] = struct.pack("<II", r, p)
    table = bytes(data[key_at:key_at + crypto.KEY_TABLE.size])
    data[HEADER.size:HEADER.size + FRAME.size] = pack_frame_header(FRAME_KEY, 0, 0, len(table), len(table),
                                                                   xxh3(table))
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedFeatureError, match="scrypt"):
        BkpReader(path, passphrase=PASSPHRASE)


def test_a_damaged_key_frame_is_a_checksum_error_not_a_wrong_passphrase(tmp_path: Path) -> None:
    path = _encrypted_file(tmp_path / "a.bkp", b"x" * 100)
    data = bytearray(path.read_bytes())
    data[HEADER.size + FRAME.size + 20] ^= 0x01  # a salt byte
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="key frame"):
        BkpReader(path, passphrase=PASSPHRASE)


# ---------------------------------------------------------------------- selective restore


def test_one_series_restored_from_an_encrypted_file(corpus: Corpus, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    reader = BkpReader(corpus.encrypted, passphrase=PASSPHRASE)
    entry = reader.manifest.instances[len(reader.manifest.instances) // 2]
    series = entry.record.series_uid
    wanted = {e.record.sop_uid: e.record.sha256 for e in reader.manifest.instances
              if e.record.series_uid == series}
    reader.close()
    monkeypatch.setenv("DV_PASS", PASSPHRASE)
    db = tmp_path / "restored"
    res = run("--db", db, "import-db", corpus.encrypted, "--series", series, "--passphrase-env", "DV_PASS")
    assert res.code == 0, res.err
    assert stored(db) == wanted


def test_inspect_without_the_passphrase_shows_what_is_not_sealed(corpus: Corpus) -> None:
    """No passphrase given and no terminal: the header and footer (version,
    creation time, frame count), and that the contents are sealed."""
    res = run("bkp", "inspect", corpus.encrypted, "--json")
    assert res.code == 0, res.err
    info = res.json()
    reader = BkpReader(corpus.encrypted, passphrase=PASSPHRASE)
    try:
        assert info["sealed"] is True and info["encrypted"] is True and info["format"] == "dicomvault-bkp"
        assert "." not in info["created"]  # whole seconds, as the manifest's own times
        assert info["version"] == f"{reader.major}.{reader.minor}"
        assert info["frames"] == len(reader.manifest.frames)
        assert info["file_id"] == reader.file_id.hex()
    finally:
        reader.close()
    text = run("bkp", "inspect", corpus.encrypted)
    assert text.code == 0 and "sealed" in text.out and "--passphrase-env" in text.out


def test_other_commands_read_an_encrypted_bkp_with_the_same_options(
        corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DV_PASS", PASSPHRASE)
    res = run("--db", corpus.db, "compare", corpus.encrypted, "--whole", "--passphrase-env", "DV_PASS",
              "--json")
    assert res.code == 0, res.err
    res = run("export-dicom", tmp_path / "out", "--from", corpus.encrypted, "--whole",
              "--passphrase-env", "DV_PASS", "--json")
    assert res.code == 0, res.err
    assert res.json()["counts"]["instance"]["stored"] == len(corpus.instances)
    # re-encrypting under another passphrase: transfer from one encrypted file to another
    monkeypatch.setenv("DV_PASS", PASSPHRASE)
    res = run("transfer", "--from", corpus.encrypted, "--to", tmp_path / "copy.bkp", "--whole",
              "--encrypt", "--passphrase-env", "DV_PASS")
    assert res.code == 0, res.err
    reader = BkpReader(tmp_path / "copy.bkp", passphrase=PASSPHRASE)
    assert {e.record.sop_uid for e in reader.manifest.instances} == set(corpus.instances)
    reader.close()


# ---------------------------------------------------------------------- the spec's test vector


def test_spec_key_derivation_and_key_check_vector() -> None:
    """The test vector of SPEC.md section 17.7, recomputed with hashlib and AESGCM directly."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    spec = (Path(__file__).parent.parent / "SPEC.md").read_text(encoding="utf-8")
    salt, prefix, file_id = bytes(range(32)), bytes(range(4)), bytes(range(16))
    key = hashlib.scrypt(b"dicomvault", salt=salt, n=1 << 10, r=8, p=1, dklen=32)
    assert key == crypto.derive_key("dicomvault", salt, 10, 8, 1)
    params = bytes([1, 1, 10, 0]) + struct.pack("<II", 8, 1) + prefix + salt
    aad_key = file_id + bytes([3, 0]) + struct.pack("<QQ", 0, 80) + params
    check = AESGCM(key).encrypt(prefix + b"\xff" * 8, b"dicomvault-bkp-1", aad_key)
    aad_frame = file_id + bytes([1, 0]) + struct.pack("<QQ", 0, 5)
    sealed = AESGCM(key).encrypt(prefix + bytes(8), b"dicom", aad_frame)
    for value in (key, params, check, sealed, aad_frame):
        assert value.hex(" ") in " ".join(spec.split()), value.hex(" ")
    # and the module agrees
    cipher = crypto.FrameCipher(key, file_id, prefix)
    assert crypto._key_check(cipher, params) == check
    assert cipher.seal(FRAME_DATA, 0, 0, 5, b"dicom") == sealed
    assert cipher.open(FRAME_DATA, 0, 0, 5, sealed, "frame 0") == b"dicom"


def test_reopening_a_file_derives_its_key_once(corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    """A volume of a set is closed and reopened while a restore or a compare goes on: the
    key of a file is derived once per process, not once per opening (scrypt is slow on purpose:
    a compare of an encrypted set once ran thousands of derivations)."""
    crypto.derive_key.cache_clear()
    calls: list[int] = []
    real = hashlib.scrypt

    def counting(*args: object, **kwargs: object) -> bytes:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(crypto.hashlib, "scrypt", counting)
    for _ in range(3):
        BkpReader(corpus.encrypted, passphrase=PASSPHRASE).close()
    assert len(calls) == 1
    with pytest.raises(WrongPassphraseError):  # a wrong passphrase is still refused, each time
        BkpReader(corpus.encrypted, passphrase="not it").close()
    with pytest.raises(WrongPassphraseError):
        BkpReader(corpus.encrypted, passphrase="not it").close()
    assert len(calls) == 2
