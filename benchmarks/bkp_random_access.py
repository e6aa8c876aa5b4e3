#!/usr/bin/env python3
"""Selective restore from a large .bkp: one series against the whole file.

Builds a .bkp of ``--size`` (default 2 GB) of incompressible generated
instances (random pixel bytes behind a small DICOM-like preamble, so the
file really is that large on disk; frames are stored raw), written with the
real BkpWriter and records the way ``export-db`` writes them, in
``--series`` series. Then times, each into a fresh embedded database:

1. ``dicomvault import-db FILE.bkp --series UID`` (a series in the middle of
   the file), run as a command (Python start-up included) and in process;
2. ``dicomvault import-db FILE.bkp`` (everything), as a command;

and prints both, the ratio, and how many bytes of the .bkp the selective
restore read (from the reader's counter). Everything is deleted afterwards
unless ``--keep``.

Page cache: ``--cache cold`` syncs and drops the page cache before every
timed run (needs a writable /proc/sys/vm/drop_caches); ``warm`` leaves it;
``auto`` (default) picks cold when allowed.

Example::

    .venv/bin/python benchmarks/bkp_random_access.py --size 2GB --work /tmp/bkp-ra
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dicomvault.cli.main import main as dicomvault_main
from dicomvault.engine import InstanceRecord, PatientRecord, SeriesRecord, StudyRecord, patient_key
from dicomvault.formats.bkp.manifest import InstanceEntry, Manifest
from dicomvault.formats.bkp.reader import BkpReader
from dicomvault.formats.bkp.writer import BkpWriter
from scriptutil import precompile

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
ROOT = "1.2.826.0.1.3680043.10.1234.77"
INSTANCE = 512 * 1024 + 1164  # a 256x256 16-bit slice and its header, roughly
POOL = 64 << 20  # random bytes that instance content is cut from (beyond zstd's reach)


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B")
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def build(path: Path, size: int, nseries: int, seed: int) -> tuple[list[str], int]:
    """The .bkp; returns the series UIDs and the number of instances."""
    rng = random.Random(seed)
    pool = rng.randbytes(POOL)
    # the preamble and the odd overlap of two slices in a frame compress a little: 3 % more
    count = max(nseries, -(-size * 103 // 100 // INSTANCE))
    per_series = -(-count // nseries)
    key = patient_key("RA0001", "", "RANDOM^ACCESS", "19700101")
    patients = [PatientRecord(key=key, patient_id="RA0001", name="RANDOM^ACCESS", birth_date="19700101")]
    study = f"{ROOT}.1"
    studies = [StudyRecord(study_uid=study, patient_key=key, date="20240101")]
    series = [SeriesRecord(series_uid=f"{ROOT}.2.{s}", study_uid=study, modality="CT", number=s + 1)
              for s in range(nseries)]
    w = BkpWriter(path, writer="dicomvault benchmark")
    entries = []
    try:
        for i in range(count):
            start = rng.randrange(0, POOL - INSTANCE)
            data = bytes(128) + b"DICM" + pool[start:start + INSTANCE - 132]
            digest = hashlib.sha256()
            blob = w.add_blob(io.BytesIO(data), digest.update)
            rec = InstanceRecord(sop_uid=f"{ROOT}.3.{i}", series_uid=series[i // per_series].series_uid,
                                 sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                 transfer_syntax="1.2.840.10008.1.2.1",
                                 number=i % per_series + 1, size=blob.length, sha256=digest.hexdigest(),
                                 imported_at="2024-01-01T00:00:00+00:00", origin="benchmark:generated")
            entries.append(InstanceEntry(rec, blob))
        w.finish(Manifest(major=0, minor=0, writer="", created="", patients=patients, studies=studies,
                          series=series, instances=entries))
    except BaseException:
        w.abort()
        raise
    assert path.stat().st_size >= size, "the generated file came out smaller than asked"
    return [s.series_uid for s in series], count


def cold(mode: str) -> None:
    if mode == "cold":
        os.sync()
        DROP_CACHES.write_text("3\n")


def timed_command(args: list[str], mode: str) -> float:
    cold(mode)
    env = dict(os.environ, DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD="1")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dicomvault", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def timed_in_process(args: list[str], mode: str) -> tuple[float, int]:
    """Seconds, and the bytes of frames the reader read."""
    counted: list[int] = []
    original = BkpReader.close

    def close(self: BkpReader) -> None:
        counted.append(self.bytes_read)
        original(self)

    cold(mode)
    BkpReader.close = close  # type: ignore[method-assign]
    try:
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            code = dicomvault_main(args)
        elapsed = time.perf_counter() - started
    finally:
        BkpReader.close = original  # type: ignore[method-assign]
    assert code == 0, f"dicomvault {' '.join(args)} exited with {code}"
    return elapsed, sum(counted)


def timed_extract(path: Path, series_uid: str, mode: str) -> tuple[float, int]:
    """The format's part alone: open the file and read every blob of one
    series, SHA-256 verified, bytes discarded. Seconds, frame bytes read."""
    cold(mode)
    started = time.perf_counter()
    r = BkpReader(path)
    try:
        for e in sorted(r.iter_instances({series_uid}), key=lambda e: e.blob.offset):
            digest = hashlib.sha256()
            with r.open_blob(e.blob) as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
            assert digest.hexdigest() == e.record.sha256
        read = r.bytes_read
    finally:
        r.close()
    return time.perf_counter() - started, read


def run(args: argparse.Namespace) -> dict[str, object]:
    mode = args.cache
    if mode == "auto":
        mode = "cold" if os.access(DROP_CACHES, os.W_OK) else "warm"
    work = args.work or Path(tempfile.mkdtemp(prefix="bkp-random-access-"))
    work.mkdir(parents=True, exist_ok=True)
    bkp = work / "big.bkp"
    try:
        t0 = time.perf_counter()
        series, count = build(bkp, parse_size(args.size), args.series, args.seed)
        build_s = time.perf_counter() - t0
        file_bytes = bkp.stat().st_size
        one = series[len(series) // 2]
        r = BkpReader(bkp)
        try:
            chosen = list(r.iter_instances({one}))
        finally:
            r.close()
        series_bytes = sum(e.blob.length for e in chosen)

        def fresh(name: str) -> Path:
            db = work / name
            shutil.rmtree(db, ignore_errors=True)
            return db

        extract_s, _read = timed_extract(bkp, one, mode)
        one_cmd = timed_command(["--db", str(fresh("db-one")), "-q", "import-db", str(bkp), "--series", one],
                                mode)
        one_in, read = timed_in_process(["--db", str(fresh("db-one")), "-q", "import-db", str(bkp),
                                         "--series", one], mode)
        full_cmd = timed_command(["--db", str(fresh("db-all")), "-q", "import-db", str(bkp)], mode)
        shutil.rmtree(work / "db-one", ignore_errors=True)
        shutil.rmtree(work / "db-all", ignore_errors=True)
        return {"cache": mode, "file_bytes": file_bytes, "instances": count, "series": len(series),
                "series_instances": len(chosen), "series_bytes": series_bytes, "build_s": round(build_s, 1),
                "extract_one_series_s": round(extract_s, 3),
                "one_series_command_s": round(one_cmd, 3), "one_series_in_process_s": round(one_in, 3),
                "one_series_frame_bytes_read": read, "full_restore_command_s": round(full_cmd, 2),
                "ratio_full_over_one": round(full_cmd / one_cmd, 1)}
    finally:
        if not args.keep:
            if args.work is None:
                shutil.rmtree(work, ignore_errors=True)
            else:
                bkp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    precompile()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2GB", help="size of the .bkp (default 2GB; 1 GB = 10^9 bytes)")
    ap.add_argument("--series", type=int, default=40, help="number of series (default 40)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", type=Path, help="scratch folder (default: a new folder under /tmp)")
    ap.add_argument("--cache", choices=["auto", "cold", "warm"], default="auto")
    ap.add_argument("--keep", action="store_true", help="keep the .bkp")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    os.environ.setdefault("DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD", "1")
    res = run(args)
    print(f"{res['file_bytes'] / 1e9:.2f} GB .bkp, {res['instances']} instances in {res['series']} series "
          f"(cache {res['cache']}); one series = {res['series_instances']} instances, "
          f"{res['series_bytes'] / 1e6:.1f} MB")
    print(f"read one series:     {res['extract_one_series_s']:.3f} s (open the file, read and verify "
          "its blobs: the format's part)")
    print(f"restore one series:  {res['one_series_command_s']:.3f} s as a command "
          f"({res['one_series_in_process_s']:.3f} s in process), "
          f"{int(res['one_series_frame_bytes_read']) / 1e6:.1f} MB of frames read")  # type: ignore[call-overload]
    print(f"restore everything:  {res['full_restore_command_s']:.2f} s as a command")
    print(f"ratio full / one series: {res['ratio_full_over_one']}x")
    if args.json_out:
        args.json_out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
