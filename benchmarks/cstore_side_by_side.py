#!/usr/bin/env python3
"""``dicomvault cstore`` side by side with DCMTK ``dcmsend``, in one run, to
the same DCMTK ``storescp`` on 127.0.0.1.

The data (synthetic PET/CT/MR studies from benchmarks/synth.py, 1 GB by
default, generated once per size) is imported into a fresh dicomvault database once (untimed). Each
timed run empties the receiver's folder first, syncs (so that the previous
run's received files are not written back during this one) and warms the page cache for
both sides (dcmsend reads the generated files, dicomvault its store: the same
bytes); every run must deliver every file, checked by counting what storescp
wrote. Reported: files/s and MB/s (payload bytes, 1 MB = 10^6 B, over wall
time) and dicomvault / dcmsend with one association and with parallel ones.
Targets (issue 6): >= 0.5x with one association, >= 1.0x with parallel ones.

    .venv/bin/python benchmarks/cstore_side_by_side.py                 # 1 GB under /tmp
    .venv/bin/python benchmarks/cstore_side_by_side.py --size 200MB --repeat 5 --sink ignore

On 200 MB a run lasts about half a second and dicomvault's start-up is a
quarter of it; 1 GB shows the sending itself.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from scriptutil import precompile, run
from side_by_side import warm

HERE = Path(__file__).resolve().parent
TOOLS = HERE.parent / "tools"
TARGET_ONE, TARGET_PARALLEL = 0.5, 1.0




def load() -> float:
    return os.getloadavg()[0]


def main(argv: list[str] | None = None) -> int:
    precompile()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GB", help="generated data size (default 1GB)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--data", type=Path, help="generated data (default /tmp/cstore-bench-data-SIZE)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cstore-bench-work"))
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per sender; the median is reported")
    ap.add_argument("--associations", type=int, default=4, help="parallel associations for the second run")
    ap.add_argument("--sink", choices=["disk", "ignore"], default="disk",
                    help="storescp writes what arrives (disk, default) or drops it (--ignore)")
    ap.add_argument("--pdu", type=int, default=131072, help="storescp's max PDU (default 131072)")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args(argv)
    args.data = args.data or Path(f"/tmp/cstore-bench-data-{args.size}")

    if not (args.data / "synth.json").exists():
        run([sys.executable, str(HERE / "synth.py"), str(args.data), "--size", args.size, "--seed",
             str(args.seed)])
    src = args.data / "DICOM" if (args.data / "DICOM").is_dir() else args.data
    files = [p for p in src.rglob("*") if p.is_file()]
    payload = sum(p.stat().st_size for p in files)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    db = args.work / "db"
    env = {**os.environ, "DICOMVAULT_DB": str(db), "DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    dv = [sys.executable, "-m", "dicomvault"]
    run([*dv, "-q", "import-dicom", str(src)], env=env)

    scp = args.work / "scp"
    extra = f"--fork -pdu {args.pdu}" + (" --ignore" if args.sink == "ignore" else "")
    run(["bash", str(TOOLS / "storescp-start.sh"), str(scp), "", "STORESCP"],
        env={**os.environ, "STORESCP_ARGS": extra})
    port = int(dict(line.split("=", 1) for line in (scp / "env").read_text().split())["STORESCP_PORT"])
    received = scp / "in"

    def timed(name: str, argv: list[str], e: dict[str, str] | None = None) -> float:
        shutil.rmtree(received, ignore_errors=True)
        received.mkdir()
        os.sync()  # the previous run's received files are not written back during this one
        warm(src)
        warm(db / "store")
        t0 = time.perf_counter()
        run(argv, env=e)
        seconds = time.perf_counter() - t0
        if args.sink == "disk":
            got = sum(1 for _ in received.iterdir())
            if got != len(files):
                sys.exit(f"{name}: storescp received {got} of {len(files)} files")
        return seconds

    parallel = f"dicomvault x{args.associations}"
    runs: dict[str, list[float]] = {"dcmsend": [], "dicomvault x1": [], parallel: []}
    loads = []
    try:
        for _ in range(args.repeat):
            loads.append(load())
            runs["dcmsend"].append(timed("dcmsend", ["dcmsend", "-q", "-aec", "STORESCP", "+sd", "+r", "-nuc",
                                                     "127.0.0.1", str(port), str(src)],
                                           {**os.environ, "TCP_NODELAY": "1"}))
            runs["dicomvault x1"].append(timed("dicomvault", [*dv, "-q", "cstore", "--to",
                                                              f"STORESCP@127.0.0.1:{port}", "--whole"], env))
            runs[parallel].append(timed(
                "dicomvault", [*dv, "-q", "cstore", "--to", f"STORESCP@127.0.0.1:{port}", "--whole",
                               "--associations", str(args.associations)], env))
    finally:
        run(["bash", str(TOOLS / "stop-pidfile.sh"), str(scp / "storescp.pid"), "10"])

    med = {k: statistics.median(v) for k, v in runs.items()}
    peer = len(files) / med["dcmsend"]
    print(f"{len(files)} files, {payload / 1e6:.1f} MB (mean {payload / len(files) / 1e3:.0f} KB), "
          f"storescp -pdu {args.pdu}, sink {args.sink}, median of {args.repeat}, "
          f"{os.cpu_count()} CPUs, load average at the runs {min(loads):.2f}-{max(loads):.2f}")
    print(f"{'sender':<18}{'files/s':>10}{'MB/s':>9}{'vs dcmsend':>12}{'target':>9}")
    out = {}
    for name, seconds in med.items():
        fps = len(files) / seconds
        ratio = fps / peer
        target = "" if name == "dcmsend" else (f">= {TARGET_ONE}x" if name.endswith("x1")
                                               else f">= {TARGET_PARALLEL}x")
        print(f"{name:<18}{fps:>10.0f}{payload / seconds / 1e6:>9.0f}{ratio:>11.2f}x{target:>9}")
        out[name] = {"seconds": seconds, "files_per_s": fps, "mb_per_s": payload / seconds / 1e6,
                     "ratio": ratio, "runs": runs[name]}
    if args.json_out:
        args.json_out.write_text(json.dumps({"files": len(files), "bytes": payload, "results": out},
                                            indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
