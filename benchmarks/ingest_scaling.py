#!/usr/bin/env python3
"""Does ingest into the embedded database stay flat as the database grows?

Generates small real-header instances (pydicom's MR_small.dcm, 9.8 KB, with
fresh same-length UIDs patched into the bytes: 200 instances a series, 5
series a study), in steps, then ingests the steps one after the other into
ONE database with ``dicomvault import-dicom`` and prints files per second
for each step against the number of instances already stored. Flat means
the last step runs at about the speed of the first. (Orthanc's SQLite index
is reported to slow down past about 25,000 instances; this measures ours.)

    .venv/bin/python benchmarks/ingest_scaling.py                    # up to 100,000
    .venv/bin/python benchmarks/ingest_scaling.py --steps 1000,5000,10000
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

from scriptutil import precompile

PER_SERIES, PER_STUDY = 200, 5


def _patched(uid: str, n: int) -> bytes:
    """A UID of the same length as ``uid``, unique per ``n`` (all digits after the patch point)."""
    return (uid[:-9] + "9" + f"{n:08d}").encode()


def generate(out: Path, first: int, last: int) -> None:
    template = Path(pydicom.__file__).parent / "data" / "test_files" / "MR_small.dcm"
    ds = pydicom.dcmread(template, stop_before_pixels=True)
    sop, series, study = ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID
    data = template.read_bytes()
    out.mkdir(parents=True, exist_ok=True)
    for i in range(first, last):
        se = i // PER_SERIES
        body = (data.replace(sop.encode(), _patched(sop, i))
                .replace(series.encode(), _patched(series, se))
                .replace(study.encode(), _patched(study, se // PER_STUDY)))
        sub = out / f"{i // 1000:04d}"
        if i % 1000 == 0 or i == first:
            sub.mkdir(exist_ok=True)
        (sub / f"{i:07d}.dcm").write_bytes(body)


def main() -> int:
    precompile()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="1000,10000,25000,50000,75000,100000",
                    help="cumulative instance counts at which to measure")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a new one under /tmp)")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="dv-ingest-scaling-"))
    db = work / "db"
    env = {**os.environ, "DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    rows = []
    done = 0
    print(f"{'stored before':>14}{'files':>8}{'seconds':>9}{'files/s':>9}")
    for total in steps:
        folder = work / f"step-{total}"
        generate(folder, done, total)
        os.sync()
        start = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "dicomvault", "--db", str(db), "import-dicom",
                              str(folder), "--json", "-q"], capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        report = json.loads(res.stdout)
        stored = report["counts"]["instance"].get("stored", 0)
        if res.returncode != 0 or stored != total - done:
            raise SystemExit(f"step {total}: exit {res.returncode}, stored {stored}: {res.stderr[-500:]}")
        rows.append({"before": done, "files": total - done, "seconds": seconds,
                     "files_per_s": (total - done) / seconds})
        print(f"{done:>14,}{total - done:>8,}{seconds:>9.2f}{(total - done) / seconds:>9.0f}", flush=True)
        subprocess.run(["rm", "-rf", str(folder)], check=True)
        done = total
    first, last = rows[0]["files_per_s"], rows[-1]["files_per_s"]
    print(f"last step / first step: {last / first:.2f}x (load {os.getloadavg()[0]:.2f}); database {db}")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
