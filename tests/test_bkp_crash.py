"""Crash safety of ``export-db``: a writer killed with SIGKILL at random
points never leaves an incomplete file under the final name, and a full
disk gives a one-line error and leaves neither the final file nor the
temporary one (SPEC 11, steps 1, 6 and 7)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from bkp_synth import Builder, hierarchy, uid
from dicomvault.cli.main import main
from dicomvault.formats.bkp import writer as writer_module
from dicomvault.formats.bkp.reader import BkpReader

KILLS = int(os.environ.get("DICOMVAULT_CRASH_KILLS", "24"))


def run(*args: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def verify_complete(path: Path, expected: dict[str, str]) -> None:
    """Opens, holds exactly ``expected`` (SOP UID -> SHA-256), every blob verifies."""
    reader = BkpReader(path)
    try:
        got = {e.record.sop_uid: e.record.sha256 for e in reader.manifest.instances}
        assert got == expected
        for e in sorted(reader.manifest.instances, key=lambda e: e.blob.offset):
            digest = hashlib.sha256()
            with reader.open_blob(e.blob) as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
            assert digest.hexdigest() == e.record.sha256, e.record.sop_uid
    finally:
        reader.close()


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """An embedded database of ~48 MB (4 series x 30 instances of 400 kB,
    half random, half compressible), restored from a synthetic .bkp."""
    root = tmp_path_factory.mktemp("crash")
    rng = random.Random(7)
    b = Builder(root / "seed.bkp")
    b.patients, b.studies, b.series = hierarchy(2, 1, 2)
    for s, se in enumerate(b.series):
        for i in range(30):
            data = rng.randbytes(200_000) + bytes([i]) * 200_000
            b.instance(uid(3, s, i), se.series_uid, data, number=i + 1)
    expected = {e.record.sop_uid: e.record.sha256 for e in b.instances}
    seed = b.finish()
    db = root / "db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD", "1")
        code, _out, err = run("--db", db, "-q", "import-db", seed)
    assert code == 0, err
    seed.unlink()
    return db, expected


def _parts(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


@pytest.mark.slow
def test_sigkill_at_random_points_never_leaves_a_partial_file(database: tuple[Path, dict[str, str]],
                                                              tmp_path: Path) -> None:
    db, expected = database
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    final = out_dir / "backup.bkp"
    env = dict(os.environ, DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD="1")
    cmd = [sys.executable, "-m", "dicomvault", "--db", str(db), "-q", "export-db", str(final), "--whole",
           "--force"]

    def start() -> tuple[subprocess.Popen[bytes], float]:
        """Start an export; returns once its temporary file exists (it has
        begun writing), with the time that took."""
        before = set(_parts(out_dir))
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not set(_parts(out_dir)) - before and proc.poll() is None:
            time.sleep(0.002)
        return proc, time.monotonic()

    # complete runs: how long the writing part of an export takes (the
    # quicker of two, so that a slow moment of a shared machine does not
    # make most kills come after the end)
    durations = []
    for _ in range(2):
        proc, began = start()
        assert proc.wait() == 0
        durations.append(time.monotonic() - began)
        verify_complete(final, expected)
        final.unlink()
    writing = min(durations)

    rng = random.Random(20240601)
    completed, interrupted_mid_write, replaced = 0, 0, 0
    for _ in range(KILLS):
        id_before = final.read_bytes()[16:32] if final.exists() else None
        proc, began = start()
        time.sleep(rng.uniform(0.0, writing * 1.1))
        proc.send_signal(signal.SIGKILL)
        code = proc.wait()
        if code == 0:
            completed += 1
        else:
            assert code == -signal.SIGKILL
            interrupted_mid_write += 1
        # whatever happened: the final name holds nothing or a complete, valid file
        # (the previous complete file, or the new one when the kill came after the rename)
        if final.exists():
            verify_complete(final, expected)
            replaced += final.read_bytes()[16:32] != id_before
        # nothing but the final name and `.NAME.<writer>.<random>.part` temporary files, and never
        # more than the one of the run just killed: each export removes those of killed ones
        assert all(p.name == final.name or (p.name.startswith(f".{final.name}.") and p.name.endswith(".part"))
                   for p in out_dir.iterdir())
        assert len(_parts(out_dir)) <= 1
    # the kills really fell in the middle of writing, many times
    assert interrupted_mid_write >= KILLS // 3, (completed, interrupted_mid_write, replaced)
    print(f"{KILLS} kills: {interrupted_mid_write} while writing, {completed} after the end; "
          f"the final name changed {replaced} times")

    # SIGKILL leaves no chance to clean up: the temporary files of killed runs
    # remain (mostly unfinished: no footer), named by the host and process that
    # wrote them; the next export to the same name removes those whose process
    # is gone, and never the file of an export still running.
    proc, _began = start()  # one more, killed as soon as it has begun writing
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = _parts(out_dir)
    assert len(leftovers) == 1
    host = socket.gethostname()
    assert all(p.startswith(f".{final.name}.{host}.") for p in leftovers)
    running = out_dir / f".{final.name}.{host}.{os.getpid()}.tmpabcd.part"  # this process: running
    running.write_bytes(b"still being written")
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    verify_complete(final, expected)
    assert _parts(out_dir) == [running.name]


# ---------------------------------------------------------------------- a full disk


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> object:
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _assert_clean_disk_full_error(code: int, err: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("dicomvault: error: "), err
    assert "No space left on device" in lines[0], err


@pytest.mark.slow
def test_export_onto_a_full_file_system(database: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """A real full disk: a 2 MB tmpfs (the export needs ~25 MB)."""
    db, _expected = database
    with small_tmpfs(tmp_path / "mnt", "2m") as mnt:
        env = dict(os.environ, DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD="1")
        proc = subprocess.run([sys.executable, "-m", "dicomvault", "--db", str(db), "export-db",
                               str(mnt / "full.bkp"), "--whole"], env=env, capture_output=True, text=True,
                              timeout=300)
        _assert_clean_disk_full_error(proc.returncode, proc.stderr)
        assert list(mnt.iterdir()) == []


class _FullDisk(io.RawIOBase):
    """A file that takes ``room`` bytes, then fails like a full disk."""

    def __init__(self, fd: int, room: int, log: list[int], once: bool = False) -> None:
        self.raw = os.fdopen(fd, "wb", buffering=0)
        self.room, self.log, self.once = room, log, once

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        n = min(len(data), self.room)
        if n == 0:
            self.log.append(len(data))
            if self.once:  # space comes back: another program deleted a file
                self.room = 1 << 40
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return self.raw.write(memoryview(data)[:n]) or 0

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        self.raw.close()
        super().close()


@pytest.mark.parametrize("room", [0, 100, 3 << 20, 9 << 20, -30_000, -40, "fsync", "once"])
def test_injected_disk_full(database: tuple[Path, dict[str, str]], tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch, room: int | str) -> None:
    """ENOSPC injected under the writer: in the header, in a frame, near the
    end (negative: that many bytes before the end of the complete file, in
    the manifest and in the footer), at the final fsync, and once only in the
    middle (space comes back a moment later: the frame that failed is lost,
    so the run must still fail rather than finish a file without it)."""
    db, expected = database
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _out, err = run("--db", db, "-q", "export-db", out_dir / "ref.bkp", "--whole")
    assert code == 0, err
    full_size = (out_dir / "ref.bkp").stat().st_size
    (out_dir / "ref.bkp").unlink()
    failures: list[int] = []
    fake_os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    if room == "fsync":
        def fsync(fd: int) -> None:
            failures.append(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fake_os.fsync = fsync
    else:
        def fdopen(fd: int, mode: str = "r", buffering: int = -1) -> object:
            assert mode == "wb"
            raw = _FullDisk(fd, 5 << 20, failures, once=True) if room == "once" else \
                _FullDisk(fd, int(room) if int(room) >= 0 else full_size + int(room), failures)
            return io.BufferedWriter(raw, buffer_size=max(buffering, 8192))
        fake_os.fdopen = fdopen
    monkeypatch.setattr(writer_module, "os", fake_os)
    code, _out, err = run("--db", db, "export-db", out_dir / "full.bkp", "--whole")
    assert failures, "the failure was not reached"
    _assert_clean_disk_full_error(code, err)
    assert list(out_dir.iterdir()) == []
    # the same export with room to spare works (nothing was left in a bad state)
    monkeypatch.undo()
    code, _out, err = run("--db", db, "-q", "export-db", out_dir / "full.bkp", "--whole")
    assert code == 0, err
    verify_complete(out_dir / "full.bkp", expected)


@pytest.mark.slow
def test_restore_and_zip_onto_a_full_file_system(database: tuple[Path, dict[str, str]],
                                                 tmp_path: Path) -> None:
    """import-db into a database, and export-dicom --zip, on a full disk: one clear error that
    stops the run (not a failure per instance, not a traceback), and nothing left behind."""
    db, _expected = database
    env = dict(os.environ, DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD="1")
    backup = tmp_path / "all.bkp"
    subprocess.run([sys.executable, "-m", "dicomvault", "--db", str(db), "-q", "export-db", str(backup),
                    "--whole"], env=env, check=True)
    with small_tmpfs(tmp_path / "mnt", "8m") as mnt:
        proc = subprocess.run([sys.executable, "-m", "dicomvault", "--db", str(mnt / "db"), "import-db",
                               str(backup)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and "No space left on device" in proc.stderr, proc.stderr
        assert proc.stderr.count("No space left on device") == 1, proc.stderr
        named = {r[0] for r in sqlite3.connect(mnt / "db" / "catalog.sqlite").execute(
            "SELECT sha256 FROM instances")}
        assert {p.name for p in (mnt / "db" / "store").glob("*/*")} == named  # what was committed only
        assert list((mnt / "db" / "tmp").iterdir()) == []
        proc = subprocess.run([sys.executable, "-m", "dicomvault", "--db", str(db), "export-dicom",
                               str(mnt / "out.zip"), "--zip", "--whole"], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and "No space left on device" in proc.stderr, proc.stderr
        assert not (mnt / "out.zip").exists() and not (mnt / "out.zip.part").exists()


def test_interrupted_restore_leaves_nothing_staged(database: tuple[Path, dict[str, str]],
                                                   tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) at several moments of an import-db: the catalog names every store file,
    the staging area is empty, and the restore run again completes."""
    db, _expected = database
    env = dict(os.environ, DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD="1")
    backup = tmp_path / "all.bkp"
    subprocess.run([sys.executable, "-m", "dicomvault", "--db", str(db), "-q", "export-db", str(backup),
                    "--whole"], env=env, check=True)
    interrupted = 0
    for n, after in enumerate((1, 10, 30, 60, 90)):  # of 120 instances in the store
        target = tmp_path / f"db{n}"
        proc = subprocess.Popen([sys.executable, "-m", "dicomvault", "--db", str(target), "-q", "import-db",
                                 str(backup)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and sum(1 for _ in target.glob("store/*/*")) < after:
            time.sleep(0.001)
        proc.send_signal(signal.SIGINT)
        interrupted += proc.wait(timeout=120) != 0
        if not (target / "catalog.sqlite").exists():
            continue
        named = {r[0] for r in sqlite3.connect(target / "catalog.sqlite").execute(
            "SELECT sha256 FROM instances UNION SELECT sha256 FROM attachments")}
        assert {p.name for p in (target / "store").glob("*/*")} == named, after
        assert list((target / "tmp").iterdir()) == [], after
        again = subprocess.run([sys.executable, "-m", "dicomvault", "--db", str(target), "-q", "import-db",
                                str(backup)], env=env, capture_output=True, text=True)
        assert again.returncode == 0, again.stderr
    assert interrupted >= 2  # the interrupts came in the middle, not after the end
