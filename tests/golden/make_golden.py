"""Make the golden .bkp files under ``tests/golden/bkp/v1/`` (run once per
new golden file; the folder is append-only: files that exist are never
rewritten, so every release keeps reading exactly what earlier ones wrote).

    python tests/golden/make_golden.py

Inputs are synthetic (made-up names in several character sets, 8x8 images,
UIDs under 2.25), never patient data. Positive files come with
``NAME.expected.json``: the records, attributes and attachments a reader
must list and the SHA-256 of every blob it must extract. Negative files
(under ``negative/``) come with ``NAME.expected.json`` too: the error class,
when it is raised (opening or extracting) and words the message must
contain. ``SHA256SUMS`` lists every file; a test holds them to it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import msgspec
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

HERE = Path(__file__).resolve().parent
V1 = HERE / "bkp" / "v1"
NEG = V1 / "negative"
sys.path.insert(0, str(HERE.parent))

from bkputil import repack, reseal_manifest  # noqa: E402
from dicomvault.formats.bkp.layout import (  # noqa: E402
    FRAME,
    FRAME_MANIFEST,
    pack_footer,
    pack_frame_header,
    xxh3,
)
from dicomvault.formats.bkp.reader import BkpReader  # noqa: E402

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
PT_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
PATIENTS = [  # (name, id, charset, birth date)
    ("Müller^Jürgen", "GOLD-001", "ISO_IR 100", "19700101"),
    ("Петрова^Анна", "GOLD-002", "ISO_IR 192", "19800202"),
    ("Nobody^Nemo", "", "", "19900303"),
]


def uid(*parts: int) -> str:
    return "2.25." + str(int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:15], "big"))


def instance(path: Path, p: int, st: int, se: int, i: int, *, modality: str, implicit: bool) -> None:
    name, pid, charset, birth = PATIENTS[p]
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = MR_STORAGE if modality == "MR" else PT_STORAGE
    ds.SOPInstanceUID = uid(p, st, se, i)
    ds.StudyDate, ds.StudyTime = f"2026{st + 1:02d}15", "101500"
    ds.Modality = modality
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = name, pid, birth, "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid(p, st), uid(p, st, se)
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = str(st + 1), se + 1, i + 1
    ds.StudyDescription = f"golden study {st + 1}"
    ds.SeriesDescription = f"golden series {se + 1}"
    rng = np.random.default_rng(p * 1000 + st * 100 + se * 10 + i)
    pixels = rng.integers(0, 4096, size=(8, 8), dtype=np.uint16)
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    meta.ImplementationClassUID = "2.25.1"
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)


def cli(db: Path, *args: str | os.PathLike[str]) -> str:
    res = subprocess.run([sys.executable, "-m", "dicomvault", "--db", str(db), "-q", *map(str, args)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"dicomvault {' '.join(map(str, args))} failed: {res.stderr}")
    return res.stdout


GOLDEN_PASSPHRASE = "golden passphrase: not a secret"  # the encrypted golden file's


def expected(path: Path, passphrase: str | None = None) -> dict:
    """What a reader must find in ``path``: everything but positions and times."""
    reader = BkpReader(path, passphrase=passphrase)
    try:
        m = reader.manifest
        out = {
            "version": f"{reader.major}.{reader.minor}",
            "required_features": m.required_features, "optional_features": m.optional_features,
            "patients": msgspec.to_builtins(m.patients), "studies": msgspec.to_builtins(m.studies),
            "series": msgspec.to_builtins(m.series),
            "instances": [msgspec.to_builtins(e.record) for e in reader.iter_instances()],
            "attributes": msgspec.to_builtins(m.attributes),
            "attachments": [msgspec.to_builtins(e.record) for e in m.attachments],
        }
        if isinstance(m.volume, msgspec.Struct):
            out["volume"] = {"index": m.volume.index, "last": m.volume.last}
        if passphrase is not None:
            out["passphrase"] = passphrase
        for e in [*reader.iter_instances(), *m.attachments]:
            with reader.open_blob(e.blob) as fh:
                assert hashlib.sha256(fh.read()).hexdigest() == e.record.sha256
    finally:
        reader.close()
    return out


def write_expected(path: Path, passphrase: str | None = None) -> None:
    target = path.with_suffix(".expected.json")
    target.write_text(json.dumps(expected(path, passphrase), indent=1, ensure_ascii=False, sort_keys=True)
                      + "\n", encoding="utf-8")


def make_encrypted(basic: Path, work: Path) -> Path:
    """``basic`` encrypted (AES-256-GCM, scrypt N=2^14 to keep the tests quick), 4 KiB frames."""
    out = work / "encrypted.bkp"
    repack(basic, out, frame_size=4096, passphrase=GOLDEN_PASSPHRASE, kdf_log2_n=14)
    return out


def make_volumes(basic: Path, work: Path) -> list[Path]:
    """``basic`` restored and exported again as a volume set of 8 KB volumes."""
    db = work / "voldb"
    cli(db, "import-db", basic)
    folder = work / "vols"
    folder.mkdir()
    # The command line refuses volumes under 64 KiB; the golden set is kept tiny on purpose.
    from dicomvault.cli.main import main as dicomvault_main
    from dicomvault.formats.bkp import volumes

    volumes.MIN_VOLUME_SIZE = 1024
    os.environ["DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    assert dicomvault_main(["--db", str(db), "-q", "export-db", str(folder / "set.bkp"), "--whole",
                            "--volume-size", "8K"]) == 0
    return sorted(folder.glob("set.*.bkp"))


def make_paged(basic: Path, work: Path) -> Path:
    """``basic`` restored and exported again with manifest pages (format 1.1,
    SPEC.md section 8.7): pages of 5 entries, so its 24 instances make four
    pages and four entries stay in the manifest; 4 KiB frames (the pages
    happen to be written before the first data frame leaves the
    compressors)."""
    db = work / "pageddb"
    cli(db, "import-db", basic)
    from dicomvault.cli.main import main as dicomvault_main
    from dicomvault.plugins import bkp_plugin

    bkp_plugin.PAGE_ENTRIES = 5
    bkp_plugin.BkpWriter = functools.partial(bkp_plugin.BkpWriter, frame_size=4096)  # type: ignore[misc]
    os.environ["DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    out = work / "paged.bkp"
    assert dicomvault_main(["--db", str(db), "-q", "export-db", str(out), "--whole"]) == 0
    return out


def make_basic(work: Path) -> Path:
    """Three patients (Latin-1, UTF-8 Cyrillic, no Patient ID), MR and PT,
    implicit and explicit VR, attributes at every level, attachments
    (one empty), small frames so that blobs span frames."""
    src = work / "in"
    src.mkdir()
    n = 0
    for p in range(3):
        for st in range(2 if p == 0 else 1):
            for se in range(2):
                for i in range(3):
                    instance(src / f"f{n:03d}.dcm", p, st, se, i, modality="MR" if se == 0 else "PT",
                             implicit=(n % 4 == 3))
                    n += 1
    db = work / "db"
    cli(db, "import-dicom", src)
    cli(db, "annotate", "--patient", "GOLD-001", "--comment", "golden patient comment", "--tag", "golden",
        "--field", "protocol=GOLD-1")
    cli(db, "annotate", "--study", uid(0, 0), "--comment", "Studie mit Umlauten: äöü", "--tag", "a",
        "--tag", "b")
    cli(db, "annotate", "--series", uid(1, 0, 1), "--field", "kinetic=2TCM", "--field", "note=Примечание")
    cli(db, "annotate", "--instance", uid(2, 0, 0, 0), "--comment", "one instance")
    voi = work / "voi.csv"
    voi.write_text("roi,mean\nliver,1.25\n", encoding="utf-8")
    empty = work / "empty.txt"
    empty.write_bytes(b"")
    cli(db, "attach", "--study", uid(0, 1), voi, "--name", "voi.csv")
    cli(db, "attach", "--series", uid(1, 0, 0), empty, "--name", "empty.txt")
    whole = work / "whole.bkp"
    cli(db, "export-db", whole, "--whole")
    out = work / "basic.bkp"
    repack(whole, out, frame_size=4096)
    return out


def make_empty(work: Path) -> Path:
    db = work / "emptydb"
    cli(db, "ls")
    out = work / "empty.bkp"
    cli(db, "export-db", out, "--whole")
    return out


def make_newer_minor(basic: Path, work: Path) -> Path:
    """``basic`` as a later minor version would write it: header and
    manifest minor 3, unknown keys at every map level, extra trailing
    elements in every array structure, an unknown optional feature, and an
    unknown non-critical frame (type 0x90) between the data frames."""
    data = basic.read_bytes()
    reader = BkpReader(basic)
    m = reader.manifest
    reader.close()
    manifest_at = int.from_bytes(data[-64:-56], "little")
    body = bytearray(data[:manifest_at])
    body[10:12] = struct.pack("<H", 3)
    body[56:64] = struct.pack("<Q", xxh3(bytes(body[:56])))
    # insert the unknown frame after data frame 1: later frames move
    cut = m.frames[2].offset
    extra_payload = b"a frame of a later minor version; readers skip it"
    extra = pack_frame_header(0x90, 0, 0, len(extra_payload), len(extra_payload), xxh3(extra_payload)) \
        + extra_payload
    shift = len(extra)
    body = body[:cut] + extra + body[cut:]
    plain = msgspec.to_builtins(m)
    plain["minor"] = 3
    plain["optional_features"] = ["thumbnails"]
    plain["future_top_level"] = {"anything": [1, 2, 3]}
    plain["frames"] = [[f[0] + (shift if f[0] >= cut else 0), *f[1:], "future element"]
                       for f in plain["frames"]]
    for e in plain["instances"]:
        e["blob"] = [*e["blob"], 0]
        e["record"]["future_field"] = "ignored"
        e["future_entry_field"] = 42
    for e in plain["attachments"]:
        e["blob"] = [*e["blob"], 0]
    for key in ("patients", "studies", "series", "attributes"):
        for r in plain[key]:
            r["future_field"] = True
    raw = msgspec.msgpack.encode(plain)
    manifest_offset = len(body)
    frame = pack_frame_header(FRAME_MANIFEST, 0, len(m.frames), len(raw), len(raw), xxh3(raw)) + raw
    file_id = bytes(body[16:32])
    out = work / "newer-minor.bkp"
    out.write_bytes(bytes(body) + frame + pack_footer(manifest_offset, FRAME.size + len(raw), len(m.frames),
                                                      file_id))
    return out


def make_negatives(basic: Path) -> None:
    data = basic.read_bytes()
    reader = BkpReader(basic)
    frame1 = reader.manifest.frames[1]
    reader.close()
    out: dict[str, tuple[bytes, dict[str, str]]] = {}
    out["truncated.bkp"] = (data[:len(data) // 2], {
        "error": "TruncatedError", "when": "open", "message": "footer"})
    out["bad-magic.bkp"] = (b"\x89DVBKQ\r\n" + data[8:], {
        "error": "NotABackupError", "when": "open", "message": "not a .bkp file"})
    flipped = bytearray(data)
    flipped[frame1.offset + FRAME.size + frame1.stored // 2] ^= 0x01
    out["checksum-mismatch.bkp"] = (bytes(flipped), {
        "error": "ChecksumError", "when": "extract", "message": "frame 1"})

    def feature(m: dict) -> None:
        m["required_features"] = ["holographic-storage"]
    out["unknown-required-feature.bkp"] = (reseal_manifest(data, feature), {
        "error": "UnsupportedFeatureError", "when": "open", "message": "holographic-storage"})
    major = bytearray(data)
    major[8:10] = struct.pack("<H", 2)
    major[56:64] = struct.pack("<Q", xxh3(bytes(major[:56])))
    out["newer-major.bkp"] = (bytes(major), {
        "error": "UnsupportedVersionError", "when": "open", "message": "2.0"})
    for name, (content, exp) in out.items():
        target = NEG / name
        if not target.exists():
            target.write_bytes(content)
            target.with_suffix(".expected.json").write_text(json.dumps(exp, indent=1, sort_keys=True) + "\n")


def main() -> None:
    V1.mkdir(parents=True, exist_ok=True)
    NEG.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        basic = V1 / "basic.bkp"
        if not basic.exists():
            os.replace(make_basic(work), basic)
            write_expected(basic)
        empty = V1 / "empty.bkp"
        if not empty.exists():
            os.replace(make_empty(work), empty)
            write_expected(empty)
        newer = V1 / "newer-minor.bkp"
        if not newer.exists():
            os.replace(make_newer_minor(basic, work), newer)
            write_expected(newer)
        encrypted = V1 / "encrypted.bkp"
        if not encrypted.exists():
            os.replace(make_encrypted(basic, work), encrypted)
            write_expected(encrypted, GOLDEN_PASSPHRASE)
        vols = V1 / "volumes"
        if not vols.exists():
            vols.mkdir()
            for vol in make_volumes(basic, work):
                os.replace(vol, vols / vol.name)
                write_expected(vols / vol.name)
        paged = V1 / "paged.bkp"
        if not paged.exists():
            os.replace(make_paged(basic, work), paged)
            write_expected(paged)
        make_negatives(basic)
    sums = V1 / "SHA256SUMS"  # append-only: a test fails when a released golden file changes
    known = sums.read_text().splitlines() if sums.exists() else []
    listed = {line.split("  ", 1)[1] for line in known}
    for p in sorted(V1.rglob("*")):
        if p.is_file() and p != sums:
            p.chmod(0o644)
            rel = p.relative_to(V1).as_posix()
            if rel not in listed:
                known.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {rel}")
            print(f"{rel}  {p.stat().st_size} bytes")
    sums.write_text("".join(line + "\n" for line in known))


if __name__ == "__main__":
    main()
