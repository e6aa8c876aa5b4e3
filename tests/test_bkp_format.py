"""The .bkp format: corrupt and truncated input, version checks, atomic
writes, and the 64-bit layout."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sqlite3
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import zstandard

from dicomvault.cli.main import main
from dicomvault.dicom.probe import read_header
from dicomvault.engine import (
    ChecksumError,
    Context,
    CorruptError,
    Event,
    FormatError,
    Hooks,
    NotABackupError,
    Selection,
    TruncatedError,
    UnsupportedFeatureError,
    UnsupportedVersionError,
    hookimpl,
    make_plugin_manager,
    transfer,
)
from dicomvault.formats.bkp import layout
from dicomvault.formats.bkp.layout import (
    CODEC_NONE,
    CODEC_ZSTD,
    FOOTER,
    FRAME,
    FRAME_DATA,
    FRAME_MANIFEST,
    HEADER,
    HEADER_MAGIC,
    pack_footer,
    pack_frame_header,
    pack_header,
    unpack_footer,
    unpack_frame_header,
    unpack_header,
    xxh3,
)
from dicomvault.formats.bkp.manifest import (
    Blob,
    FrameEntry,
    InstanceEntry,
    Manifest,
    decoder,
    encoder,
)
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
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return Run(code, out.getvalue(), err.getvalue())


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def db_state(db: Path) -> dict[str, object]:
    """Catalog content (plain SQL), the catalog file's bytes and every store
    file's size, mtime and hash."""
    with contextlib.closing(sqlite3.connect(db / "catalog.sqlite")) as conn:
        tables = {t: sorted(map(repr, conn.execute(f"SELECT * FROM {t}")))
                  for t in ("patients", "studies", "series", "instances", "attributes", "attachments")}
    files = {}
    for f in sorted(db.rglob("*")):
        if f.is_file() and not f.name.startswith("catalog.sqlite"):
            st = f.stat()
            files[str(f.relative_to(db))] = (st.st_size, st.st_mtime_ns, sha256_file(f))
    return {"tables": tables, "files": files, "catalog": sha256_file(db / "catalog.sqlite")}


def stored_instances(db: Path) -> dict[str, str]:
    """SOP Instance UID -> SHA-256 of the stored bytes, hashed from the store
    files on disk (every store file is checked against its catalog row)."""
    with contextlib.closing(sqlite3.connect(db / "catalog.sqlite")) as conn:
        rows = dict(conn.execute("SELECT sop_uid, sha256 FROM instances"))
    on_disk = {sha256_file(f) for f in (db / "store").rglob("*") if f.is_file()}
    assert set(rows.values()) <= on_disk
    return rows


def one_line_error(res: Run) -> str:
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert len(lines) == 1, res.err
    assert lines[0].startswith("dicomvault: error: "), res.err
    assert "Traceback" not in res.err
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


# ---------------------------------------------------------------------- fixtures


@dataclass
class Corpus:
    db: Path
    bkp: Path
    data: bytes  # the .bkp's bytes
    manifest: Manifest
    target: Path  # a small database to import corrupt files into (copy it before use)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, real_dicom: list[str]) -> Corpus:
    root = tmp_path_factory.mktemp("format")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DICOMVAULT_DB", str(root / "default-db"))
        mp.setenv("DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD", "1")
        db = root / "db"
        assert run("--db", db, "import-dicom", *real_dicom).code == 1  # broken files on purpose
        bkp = root / "whole.bkp"
        assert run("--db", db, "export-db", bkp, "--whole").code == 0
        target = root / "target"
        charset = next(f for f in real_dicom if f.endswith("charset_files"))
        res = run("--db", target, "import-dicom", charset, "--json")
        assert res.json()["counts"]["instance"]["stored"] > 5, res.err
    reader = BkpReader(bkp)
    manifest = reader.manifest
    reader.close()
    assert len(manifest.frames) >= 3, "the corpus should fill several frames"
    return Corpus(db=db, bkp=bkp, data=bkp.read_bytes(), manifest=manifest, target=target)


@pytest.fixture
def target(corpus: Corpus, tmp_path: Path) -> Path:
    copy = tmp_path / "target"
    shutil.copytree(corpus.target, copy)
    return copy


# ---------------------------------------------------------------------- crafting damaged files


def _footer(data: bytes) -> tuple[int, int, int, bytes]:
    return unpack_footer(data[-FOOTER.size:])


def _manifest_bytes(data: bytes) -> bytes:
    moff, _mlen, _n, _id = _footer(data)
    _t, codec, _seq, stored, raw, _c = unpack_frame_header(data[moff:moff + FRAME.size], moff)
    payload = data[moff + FRAME.size:moff + FRAME.size + stored]
    return zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw) \
        if codec == CODEC_ZSTD else payload


def with_manifest(data: bytes, change: Callable[[Manifest], object]) -> bytes:
    """The file with its manifest rewritten, every checksum valid."""
    moff, _mlen, nframes, file_id = _footer(data)
    m = decoder.decode(_manifest_bytes(data))
    result = change(m)
    raw = result if isinstance(result, bytes) else encoder.encode(m)
    frame = pack_frame_header(FRAME_MANIFEST, CODEC_NONE, nframes, len(raw), len(raw), xxh3(raw)) + raw
    return data[:moff] + frame + pack_footer(moff, len(frame), nframes, file_id)


def with_header(data: bytes, major: int, minor: int = 0) -> bytes:
    _magic, _maj, _min, flags, file_id, created, reserved, _c = HEADER.unpack(data[:HEADER.size])
    body = HEADER.pack(HEADER_MAGIC, major, minor, flags, file_id, created, reserved, 0)[:56]
    return body + struct.pack("<Q", xxh3(body)) + data[HEADER.size:]


def with_footer(data: bytes, **change: object) -> bytes:
    moff, mlen, nframes, file_id = _footer(data)
    values = {"manifest_offset": moff, "manifest_length": mlen, "frames": nframes, "file_id": file_id}
    values.update(change)
    return data[:-FOOTER.size] + pack_footer(**values)


def flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 0x5A
    return bytes(b)


def _replace_frame(m: Manifest, index: int, **change: int) -> None:
    m.frames[index] = msgspec.structs.replace(m.frames[index], **change)


def _blob_outside(m: Manifest) -> None:
    e = m.instances[0]
    m.instances[0] = InstanceEntry(e.record, Blob(e.blob.offset, 1 << 40))


def _blob_shorter_than_record(m: Manifest) -> None:
    e = m.instances[0]
    m.instances[0] = InstanceEntry(e.record, Blob(e.blob.offset, e.blob.length - 1))


def _feature(m: Manifest) -> None:
    m.required_features = ["encryption-v9"]


def _major(m: Manifest) -> None:
    m.major = 7


def _frame_count(m: Manifest) -> None:
    m.frames.pop()


# name -> (make the damaged bytes from the good ones, expected error, words in the message)
Damage = Callable[[bytes, Manifest], bytes]


def _moff(d: bytes) -> int:
    return _footer(d)[0]


def _mlen(d: bytes) -> int:
    return _footer(d)[1]


CASES: dict[str, tuple[Damage, type[FormatError] | tuple[type[FormatError], ...], str]] = {
    "empty file": (lambda d, m: b"", NotABackupError, "not a .bkp"),
    "text file": (lambda d, m: b"PatientName,Modality\nnobody,CT\n" * 40, NotABackupError, "not a .bkp"),
    "dicom file": (lambda d, m: Path(m.instances[0].record.origin[5:]).read_bytes(), NotABackupError,
                   "not a .bkp"),
    "bad magic": (lambda d, m: b"\x89DVBKQ" + d[6:], NotABackupError, "not a .bkp"),
    "zstd stream": (lambda d, m: zstandard.ZstdCompressor().compress(d[:100_000]), NotABackupError,
                    "not a .bkp"),
    "cut inside magic": (lambda d, m: d[:5], (NotABackupError, TruncatedError), ""),
    "cut inside header": (lambda d, m: d[:40], TruncatedError, "truncated"),
    "header only": (lambda d, m: d[:HEADER.size], TruncatedError, "truncated"),
    "cut inside first frame header": (lambda d, m: d[:HEADER.size + 20], TruncatedError, "truncated"),
    "cut inside a frame": (lambda d, m: d[:m.frames[1].offset + FRAME.size + m.frames[1].stored // 2],
                           TruncatedError, "truncated"),
    "cut before manifest": (lambda d, m: d[:_moff(d)], TruncatedError, "truncated"),
    "cut inside manifest": (lambda d, m: d[:_moff(d) + _mlen(d) // 2], TruncatedError, "truncated"),
    "footer missing": (lambda d, m: d[:-FOOTER.size], TruncatedError, "footer"),
    "cut inside footer": (lambda d, m: d[:-20], TruncatedError, "footer"),
    "last byte missing": (lambda d, m: d[:-1], TruncatedError, "footer"),
    "trailing garbage": (lambda d, m: d + b"\0" * 100, TruncatedError, "footer"),
    "flipped byte in header": (lambda d, m: flip(d, 30), ChecksumError, "header"),
    "flipped byte in manifest": (lambda d, m: flip(d, _moff(d) + FRAME.size + _mlen(d) // 3), ChecksumError,
                                 "manifest"),
    "flipped byte in manifest frame header": (lambda d, m: flip(d, _moff(d) + 20), ChecksumError,
                                              "damaged"),
    "flipped byte in footer": (lambda d, m: flip(d, len(d) - FOOTER.size + 3), ChecksumError, "footer"),
    "flipped byte in footer checksum": (lambda d, m: flip(d, len(d) - 12), ChecksumError, "footer"),
    "flipped byte in footer magic": (lambda d, m: flip(d, len(d) - 1), (TruncatedError, CorruptError),
                                     "footer"),
    "footer of another file": (lambda d, m: with_footer(d, file_id=os.urandom(16)), CorruptError,
                               "different"),
    "footer points outside": (lambda d, m: with_footer(d, manifest_offset=_moff(d) + (1 << 33)),
                              CorruptError, "outside"),
    "footer points at a data frame": (lambda d, m: with_footer(d, manifest_offset=m.frames[0].offset),
                                      CorruptError, "manifest"),
    "manifest not msgpack": (lambda d, m: with_manifest(d, lambda _m: b"\xc1 not a manifest"),
                             CorruptError, "manifest"),
    "frame index inconsistent": (lambda d, m: with_manifest(d, lambda mm: _replace_frame(
        mm, 1, stream_offset=mm.frames[1].stream_offset + 1)), CorruptError, "frame 1"),
    "frame beyond manifest": (lambda d, m: with_manifest(d, lambda mm: _replace_frame(
        mm, 0, offset=_moff(d))), CorruptError, "frame 0"),
    "frame count disagrees": (lambda d, m: with_manifest(d, _frame_count), CorruptError, "frames"),
    "blob outside payload": (lambda d, m: with_manifest(d, _blob_outside), CorruptError, "blob"),
    "record size differs from blob": (lambda d, m: with_manifest(d, _blob_shorter_than_record), CorruptError,
                                      "record says"),
    "newer major version in header": (lambda d, m: with_header(d, 2, 3), UnsupportedVersionError, "2.3"),
    "newer major version in manifest": (lambda d, m: with_manifest(d, _major), UnsupportedVersionError,
                                        "7."),
    "unknown required feature": (lambda d, m: with_manifest(d, _feature), UnsupportedFeatureError,
                                 "encryption-v9"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_bkp_is_refused_in_process(corpus: Corpus, tmp_path: Path, case: str) -> None:
    damage, error, words = CASES[case]
    bad = tmp_path / "bad.bkp"
    bad.write_bytes(damage(corpus.data, corpus.manifest))
    with pytest.raises(error) as info:
        BkpReader(bad)
    assert words.lower() in str(info.value).lower()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_bkp_import_fails_cleanly(cli, corpus: Corpus, target: Path, tmp_path: Path,
                                          case: str) -> None:
    """Exit 2, one line naming the problem, and the database untouched (an
    existing one unchanged, a missing one not created)."""
    damage, _error, words = CASES[case]
    bad = tmp_path / "bad.bkp"
    bad.write_bytes(damage(corpus.data, corpus.manifest))
    before = db_state(target)
    for extra in ((), ("--dry-run",), ("--on-conflict", "overwrite")):
        res = cli("--db", target, "import-db", bad, *extra)
        assert res.code == 2, (extra, res.err)
        assert words.lower() in one_line_error(res).lower()
        assert res.out == ""
    assert db_state(target) == before
    fresh = tmp_path / "fresh"
    res = cli("--db", fresh, "import-db", bad)
    assert res.code == 2
    one_line_error(res)
    assert not fresh.exists()
    res = cli("--db", target, "compare", bad)
    assert res.code == 2
    one_line_error(res)


def test_version_error_names_the_version(corpus: Corpus, tmp_path: Path) -> None:
    bad = tmp_path / "future.bkp"
    bad.write_bytes(with_header(corpus.data, layout.MAJOR + 1, 4))
    with pytest.raises(UnsupportedVersionError, match=rf"\b{layout.MAJOR + 1}\.4\b"):
        BkpReader(bad)
    # a newer minor version of the same major is read
    newer_minor = tmp_path / "minor.bkp"
    newer_minor.write_bytes(with_header(corpus.data, layout.MAJOR, layout.MINOR + 5))
    reader = BkpReader(newer_minor)
    assert (reader.major, reader.minor) == (layout.MAJOR, layout.MINOR + 5)
    assert len(reader.manifest.instances) == len(corpus.manifest.instances)
    reader.close()


def _frame_users(m: Manifest, index: int) -> set[str]:
    """SOP Instance UIDs whose bytes lie (partly) in data frame ``index``."""
    fe = m.frames[index]
    lo, hi = fe.stream_offset, fe.stream_offset + fe.raw
    return {e.record.sop_uid for e in m.instances
            if e.blob.offset < hi and e.blob.offset + e.blob.length > lo}


@pytest.mark.parametrize("where", ["payload", "frame header"])
def test_flipped_byte_in_one_data_frame(cli, corpus: Corpus, tmp_path: Path, where: str) -> None:
    """The instances in the other frames are restored; those in the damaged
    frame are reported failed by SOP Instance UID; exit 1."""
    m = corpus.manifest
    index = len(m.frames) // 2
    fe = m.frames[index]
    pos = fe.offset + FRAME.size + fe.stored // 2 if where == "payload" else fe.offset + 12
    bad = tmp_path / "damaged.bkp"
    bad.write_bytes(flip(corpus.data, pos))
    damaged = _frame_users(m, index)
    everything = {e.record.sop_uid for e in m.instances}
    assert damaged and damaged != everything

    reader = BkpReader(bad)  # the index is intact: the file opens
    try:
        with pytest.raises(ChecksumError, match=f"frame {index}|offset {fe.offset}"):
            reader.read_frame(index)
        for i in range(len(m.frames)):
            if i != index:
                assert len(reader.read_frame(i)) == m.frames[i].raw
    finally:
        reader.close()

    restored = tmp_path / "restored"
    res = cli("--db", restored, "import-db", bad, "--json")
    assert res.code == 1, res.err
    report = res.json()
    assert report["counts"]["instance"] == {"stored": len(everything - damaged), "failed": len(damaged)}
    assert {p["item"] for p in report["problems"] if p["what"] == "instance"} == damaged
    assert all(p["outcome"] == "failed" for p in report["problems"])
    for uid in damaged:
        assert uid in res.err
    assert "Traceback" not in res.err
    expected = {e.record.sop_uid: e.record.sha256 for e in m.instances if e.record.sop_uid not in damaged}
    assert stored_instances(restored) == expected
    assert not list((restored / "tmp").iterdir())  # no half-staged file left behind


# ---------------------------------------------------------------------- atomic writes


def test_bkp_files_are_private(cli, corpus: Corpus, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        a, b = tmp_path / "a.bkp", tmp_path / "b.bkp"
        assert cli("--db", corpus.db, "export-db", a, "--whole").code == 0
        assert cli("--db", corpus.db, "transfer", "--to", b, "--study",
                   corpus.manifest.studies[0].study_uid).code == 0
    finally:
        os.umask(old)
    for f in (a, b):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert leftovers(tmp_path) == []


def test_export_refuses_to_overwrite_without_force(cli, corpus: Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out.bkp"
    out.write_bytes(b"precious older backup")
    out.chmod(0o644)
    res = cli("--db", corpus.db, "export-db", out, "--whole")
    assert res.code == 64
    assert "--force" in one_line_error(res)
    assert out.read_bytes() == b"precious older backup"
    res = cli("--db", corpus.db, "transfer", "--to", out, "--whole")
    assert res.code == 64 and out.read_bytes() == b"precious older backup"
    assert leftovers(tmp_path) == []

    res = cli("--db", corpus.db, "export-db", out, "--whole", "--force")
    assert res.code == 0, res.err
    reader = BkpReader(out)
    assert len(reader.manifest.instances) == len(corpus.manifest.instances)
    reader.close()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["missing folder", "parent is a file"])
def test_export_to_an_impossible_path(cli, corpus: Corpus, tmp_path: Path, where: str) -> None:
    if where == "missing folder":
        out = tmp_path / "no" / "such" / "folder" / "out.bkp"
    else:
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "out.bkp"
    res = cli("--db", corpus.db, "export-db", out, "--whole")
    assert res.code in (2, 64)
    one_line_error(res)
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if where == "missing folder" else ["afile"])


def test_export_whose_temporary_file_cannot_be_made(cli, corpus: Corpus, tmp_path: Path) -> None:
    """The final name fits the file system's limit but the temporary name
    (final name plus a prefix and suffix) does not: a clean error."""
    out = tmp_path / ("x" * 240 + ".bkp")
    res = cli("--db", corpus.db, "export-db", out, "--whole")
    assert res.code == 2
    one_line_error(res)
    assert list(tmp_path.iterdir()) == []


def test_export_that_cannot_be_renamed_into_place(cli, corpus: Corpus, tmp_path: Path) -> None:
    """--force onto a folder called OUT.bkp is refused before anything is
    written; and a folder (or device, pipe) that appears under the final
    name while the writer works makes the final step fail cleanly: no
    temporary file left behind, the folder untouched."""
    from dicomvault.engine import TargetError
    from dicomvault.formats.bkp.manifest import Manifest
    from dicomvault.formats.bkp.writer import BkpWriter

    out = tmp_path / "out.bkp"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    res = cli("--db", corpus.db, "export-db", out, "--whole", "--force")
    assert res.code == 64
    one_line_error(res)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bkp"]
    assert (out / "keep.txt").read_text() == "keep"

    late = tmp_path / "late.bkp"
    writer = BkpWriter(late, writer="tests")
    writer.add_blob(io.BytesIO(b"x" * 1000))
    late.mkdir()
    with pytest.raises(TargetError, match="not a regular file"):
        writer.finish(Manifest(major=0, minor=0, writer="", created=""))
    writer.abort()
    assert late.is_dir() and not list(late.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.bkp", "out.bkp"]


def _copy_db(corpus: Corpus, tmp_path: Path) -> tuple[Path, str, Path]:
    """A copy of the corpus database and one instance with its store file
    (an instance whose bytes no other instance shares)."""
    db = tmp_path / "db"
    shutil.copytree(corpus.db, db)
    with contextlib.closing(sqlite3.connect(db / "catalog.sqlite")) as conn:
        uid, sha = conn.execute("SELECT sop_uid, sha256 FROM instances WHERE sha256 IN (SELECT sha256 FROM "
                                "instances GROUP BY sha256 HAVING count(*) = 1) ORDER BY size DESC, "
                                "sop_uid LIMIT 1").fetchone()
    (path,) = [f for f in (db / "store").rglob("*") if f.is_file() and sha256_file(f) == sha]
    return db, uid, path


@pytest.mark.parametrize("damage", ["vanished", "changed"])
def test_export_with_a_damaged_store_file(cli, corpus: Corpus, tmp_path: Path, damage: str) -> None:
    """One unreadable or altered store file: that instance is reported
    failed, the others are written into a complete, valid .bkp (exit 1);
    damaged bytes are never backed up as if they were good."""
    db, uid, path = _copy_db(corpus, tmp_path)
    if damage == "vanished":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 0x01
        path.chmod(0o600)
        path.write_bytes(bytes(data))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "partial.bkp"
    res = cli("--db", db, "export-db", out, "--whole", "--json")
    assert res.code == 1, res.err
    report = res.json()
    assert [(p["what"], p["item"], p["outcome"]) for p in report["problems"]] == [("instance", uid, "failed")]
    assert uid in res.err
    assert sorted(p.name for p in out_dir.iterdir()) == ["partial.bkp"]
    reader = BkpReader(out)
    try:
        entries = reader.manifest.instances
        everything = {e.record.sop_uid for e in corpus.manifest.instances}
        assert {e.record.sop_uid for e in entries} == everything - {uid}
        for e in entries:
            with reader.open_blob(e.blob) as fh:
                assert hashlib.sha256(fh.read()).hexdigest() == e.record.sha256
    finally:
        reader.close()


class _Bomb:
    """A plugin whose notification hook raises half-way through a run, and
    notes what the output folder held at that moment."""

    def __init__(self, after: int, folder: Path, exc: BaseException) -> None:
        self.after, self.folder, self.exc = after, folder, exc
        self.seen = 0
        self.at_raise: list[tuple[str, int]] = []

    @hookimpl
    def dicomvault_on_event(self, event: Event) -> None:
        if event.kind == "item":
            self.seen += 1
            if self.seen == self.after:
                self.at_raise = [(p.name, p.stat().st_size) for p in self.folder.iterdir()]
                raise self.exc


@pytest.mark.parametrize("exc", [RuntimeError("plugin bug"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_export_interrupted_by_a_plugin_leaves_nothing(corpus: Corpus, tmp_path: Path,
                                                       exc: BaseException) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "interrupted.bkp"
    bomb = _Bomb(after=len(corpus.manifest.instances) - 3, folder=out_dir, exc=exc)
    ctx = Context(Hooks(make_plugin_manager(autoload=False, extra=[bomb])), str(corpus.db))
    try:
        source = ctx.open_database().source()
        target = ctx.open_target(f"bkp:{out}")
        with pytest.raises(type(exc)):
            transfer(ctx, source, target, Selection(whole=True), operation="export-db")
        source.close()
    finally:
        ctx.close()
    # the run really was half-way: the temporary file existed ...
    assert len(bomb.at_raise) == 1 and bomb.at_raise[0][0].endswith(".part")
    assert bomb.at_raise[0][1] >= HEADER.size
    # ... and nothing is left: no final file, no temporary file
    assert list(out_dir.iterdir()) == []


# ---------------------------------------------------------------------- 64-bit layout

EDGES = [0, 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**32, 2**32 + 1, 2**33 + 5, 2**53 + 1,
         2**63 - 1, 2**63, 2**64 - 1]


@pytest.mark.parametrize("value", EDGES)
def test_frame_header_round_trips_64_bit_values(value: int) -> None:
    other = (value * 0x9E3779B97F4A7C15) % 2**64  # distinct values per field catch swapped fields
    third = value ^ 0x5555
    for ftype, codec in ((FRAME_DATA, CODEC_ZSTD), (FRAME_MANIFEST, CODEC_NONE)):
        raw = pack_frame_header(ftype, codec, seq=value, stored=other, raw=third, payload_xxh3=value)
        assert len(raw) == FRAME.size
        assert unpack_frame_header(raw, 0) == (ftype, codec, value, other, third, value)
        assert unpack_frame_header(pack_frame_header(ftype, codec, third, value, other, other), 0) == \
            (ftype, codec, third, value, other, other)


@pytest.mark.parametrize("value", EDGES)
def test_footer_round_trips_64_bit_values(value: int) -> None:
    file_id = hashlib.md5(str(value).encode()).digest()
    other = (value * 0x9E3779B97F4A7C15) % 2**64
    raw = pack_footer(value, other, value ^ 1, file_id)
    assert len(raw) == FOOTER.size
    assert unpack_footer(raw) == (value, other, value ^ 1, file_id)
    assert unpack_footer(pack_footer(other, value, 3, file_id)) == (other, value, 3, file_id)


@pytest.mark.parametrize("value", [v for v in EDGES if v < 2**63])
def test_header_round_trips_64_bit_creation_time(value: int) -> None:
    file_id = os.urandom(16)
    raw = pack_header(file_id, value)
    assert len(raw) == HEADER.size
    assert unpack_header(raw) == (layout.MAJOR, layout.MINOR, file_id, value)


@pytest.mark.parametrize("bad", [-1, 2**64, 2**64 + 2**31])
def test_out_of_range_values_are_refused_not_wrapped(bad: int) -> None:
    with pytest.raises(struct.error):
        pack_frame_header(FRAME_DATA, CODEC_ZSTD, 0, bad, 1, 0)
    with pytest.raises(struct.error):
        pack_footer(bad, 1, 1, bytes(16))


@pytest.mark.parametrize("value", [v for v in EDGES if v < 2**63])
def test_manifest_round_trips_64_bit_offsets(value: int) -> None:
    m = Manifest(major=1, minor=0, writer="test", created="2024-01-01T00:00:00+00:00",
                 frames=[FrameEntry(value, value // 2 + 1, value, CODEC_ZSTD, value // 3)])
    back = decoder.decode(encoder.encode(m))
    assert back.frames == m.frames
    assert back.frames[0].offset == value and back.frames[0].stream_offset == value // 3
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(Blob(value, value // 7)), type=Blob) == \
        Blob(value, value // 7)


def test_reader_follows_offsets_beyond_4_gib(cli, pydicom_files: Path, tmp_path: Path) -> None:
    """A hand-made .bkp whose data frame starts past 2**32 (a sparse file):
    the reader finds it and import-db restores the instance byte for byte."""
    src = pydicom_files / "CT_small.dcm"
    data = src.read_bytes()
    head = read_header(src)
    record = msgspec.structs.replace(head.instance, sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                                     imported_at="2024-01-01T00:00:00+00:00", origin="file:" + str(src))
    offset = 2**32 + 4099
    path = tmp_path / "sparse.bkp"
    file_id = os.urandom(16)
    with open(path, "wb") as fh:
        fh.write(pack_header(file_id, time.time_ns()))
        fh.seek(offset)
        fh.write(pack_frame_header(FRAME_DATA, CODEC_NONE, 0, len(data), len(data), xxh3(data)) + data)
        moff = fh.tell()
        m = Manifest(major=layout.MAJOR, minor=layout.MINOR, writer="test", created="2024-01-01",
                     frames=[FrameEntry(offset, len(data), len(data), CODEC_NONE, 0)],
                     patients=[head.patient], studies=[head.study], series=[head.series],
                     instances=[InstanceEntry(record, Blob(0, len(data)))])
        raw = encoder.encode(m)
        frame = pack_frame_header(FRAME_MANIFEST, CODEC_NONE, 1, len(raw), len(raw), xxh3(raw)) + raw
        fh.write(frame)
        fh.write(pack_footer(moff, len(frame), 1, file_id))
    st = path.stat()
    if st.st_blocks * 512 > 64 << 20:
        pytest.skip("this file system does not keep sparse files sparse")
    assert st.st_size > 2**32

    reader = BkpReader(path)
    try:
        assert reader.manifest.frames[0].offset == offset
        with reader.open_blob(reader.manifest.instances[0].blob) as fh:
            assert fh.read() == data
    finally:
        reader.close()
    db = tmp_path / "db"
    res = cli("--db", db, "import-db", path, "--json")
    assert res.code == 0, res.err
    assert res.json()["counts"]["instance"] == {"stored": 1}
    assert stored_instances(db) == {record.sop_uid: record.sha256}


# ---------------------------------------------------------------------- frame decoding limits


@pytest.mark.parametrize("announced", [1 << 40, 99, 101])
def test_frame_whose_zstd_size_disagrees_is_refused_before_allocating(corpus: Corpus, announced: int) -> None:
    """A damaged or crafted ``raw`` must give *corrupt*, never a MemoryError
    or a 1 TiB allocation: the zstd frame's own content size is checked first."""
    payload = zstandard.ZstdCompressor().compress(b"x" * 100)
    reader = BkpReader(corpus.bkp)
    try:
        with pytest.raises(CorruptError, match="announces 100 bytes"):
            reader._decode(payload, CODEC_ZSTD, announced, "frame 0")
        assert reader._decode(payload, CODEC_ZSTD, 100, "frame 0") == b"x" * 100
    finally:
        reader.close()


def test_zstd_frame_without_content_size_is_refused(corpus: Corpus) -> None:
    payload = zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 100)
    reader = BkpReader(corpus.bkp)
    try:
        with pytest.raises(CorruptError, match="frame 3"):
            reader._decode(payload, CODEC_ZSTD, 100, "frame 3")
    finally:
        reader.close()


def test_missing_bkp_is_not_called_a_format_error(tmp_path: Path) -> None:
    with pytest.raises(Exception) as info:
        BkpReader(tmp_path / "nowhere.bkp")
    assert not isinstance(info.value, FormatError)
    assert "cannot open" in str(info.value) and "nowhere.bkp" in str(info.value)


def test_instances_without_their_series_are_named_on_import(cli, corpus: Corpus, tmp_path: Path) -> None:
    """An instance whose series record is missing cannot be restored; a whole
    import names it instead of leaving it behind silently."""
    lost: list[str] = []

    def drop_series(m: Manifest) -> None:
        series = m.series.pop(0)
        lost.extend(e.record.sop_uid for e in m.instances if e.record.series_uid == series.series_uid)

    bad = tmp_path / "orphans.bkp"
    bad.write_bytes(with_manifest(corpus.data, drop_series))
    assert lost
    fresh = tmp_path / "fresh"
    res = cli("--db", fresh, "import-db", bad, "--json")
    assert res.code == 1, res.err
    report = res.json()
    named = {p["item"] for p in report["problems"] if "missing from the backup" in p["reason"]}
    assert named == {f"instance {uid}" for uid in lost}
    assert not set(stored_instances(fresh)) & set(lost)
    assert len(stored_instances(fresh)) == len(corpus.manifest.instances) - len(lost)
