#!/usr/bin/env python3
"""``dicomvault replicate`` side by side with ``cp -r`` of the content store.

One run, on one generated data set (benchmarks/synth.py, 1 GB by default),
ingested once (untimed) into an embedded database, then timed:

1. ``cp -r SRC/store DST`` (the peer: a plain copy of the files), and the
   ``sync -f`` it then needs to be durable, recorded beside it;
2. ``dicomvault replicate --whole --to NEWDIR`` (embedded to embedded);
3. ``dicomvault replicate --whole --to postgresql://...?store=NEWDIR``
   (embedded to a PostgreSQL server started here on 127.0.0.1, with
   fsync and synchronous commit ON, i.e. durable like the others).

dicomvault re-hashes every byte (SHA-256), fsyncs every file and commits a
catalog; ``cp`` does none of that. Throughput is payload bytes (the sum of
the DICOM file sizes, 1 MB = 10^6 bytes) over wall time for everyone;
the ratio printed is dicomvault's throughput over ``cp -r``'s (higher is
better; 1.0 = as fast as cp). Page cache as in side_by_side.py.

    .venv/bin/python benchmarks/replicate_side_by_side.py               # 1 GB under /tmp
    .venv/bin/python benchmarks/replicate_side_by_side.py --size 5GB --repeat 3
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from scriptutil import precompile  # noqa: E402
from side_by_side import (  # noqa: E402  (the measuring helpers are shared)
    MB,
    Cache,
    Run,
    check_ok,
    dv_report,
    ensure_data,
    folder_stats,
    measure,
    median_run,
    remove,
    stored,
    timed_flush,
)


def _as_pg(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


class Postgres:
    """A private, durable PostgreSQL cluster on 127.0.0.1 for the benchmark."""

    def __init__(self, state: Path) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        if not bins:
            raise SystemExit("PostgreSQL server missing: run tools/peers-setup.sh")
        self.bin, self.state = bins[-1], state
        state.mkdir(parents=True, exist_ok=True)
        state.chmod(0o755)
        if os.geteuid() == 0:
            subprocess.run(["chown", "postgres:postgres", str(state)], check=True)
        port = subprocess.run(["bash", str(HERE.parent / "tools" / "freeport.sh")], capture_output=True,
                              text=True, check=True).stdout.split()[0]
        subprocess.run(_as_pg([str(self.bin / "initdb"), "-D", str(state / "data"), "-A", "trust", "-U",
                               "postgres", "-E", "UTF8", "--locale=C.UTF-8"]), check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(_as_pg([str(self.bin / "pg_ctl"), "-D", str(state / "data"), "-l",
                               str(state / "server.log"), "-w", "-o",
                               f"-c listen_addresses=127.0.0.1 -p {port} -k {state}", "start"]),
                       check=True, stdout=subprocess.DEVNULL)
        self.base = f"postgresql://postgres@127.0.0.1:{port}"

    def new_database(self, name: str) -> str:
        subprocess.run(["psql", f"{self.base}/postgres", "-qc", f'DROP DATABASE IF EXISTS "{name}"'],
                       check=True)
        subprocess.run(["psql", f"{self.base}/postgres", "-qc", f'CREATE DATABASE "{name}"'], check=True)
        return f"{self.base}/{name}"

    def stop(self) -> None:
        subprocess.run(_as_pg([str(self.bin / "pg_ctl"), "-D", str(self.state / "data"), "-m", "fast",
                               "stop"]), check=False, stdout=subprocess.DEVNULL)


def main() -> int:
    precompile()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GB")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--data", type=Path,
                    help="generated data (default /tmp/dicomvault-bench/synth-SIZE-seedN)")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a new one under /tmp)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--cache", choices=["auto", "cold", "warm"], default="auto")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    data = args.data or Path(f"/tmp/dicomvault-bench/synth-{args.size}-seed{args.seed}")
    ensure_data(data, args.size, args.seed)
    nfiles, payload = folder_stats(data / "DICOM")
    work = args.work or Path(tempfile.mkdtemp(prefix="dv-replicate-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "stderr.log"
    dv = [sys.executable, "-m", "dicomvault"]
    env = {**os.environ, "DICOMVAULT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    env.pop("DICOMVAULT_DB", None)
    cache = Cache(args.cache, warm_code=[*dv, "--version"])
    src = work / "src"
    print(f"data: {nfiles} files, {payload / MB:.1f} MB; ingesting into {src} (untimed) ...", file=sys.stderr)
    remove(src)
    ingest = measure("ingest", [*dv, "--db", str(src), "import-dicom", str(data / "DICOM"), "--json"],
                     env=env, log=log)
    check_ok(ingest, log)
    if stored(dv_report(ingest)) != nfiles:
        raise SystemExit("ingest did not store every file")
    pg = Postgres(work / "pg")
    runs: dict[str, list[Run]] = {"cp": [], "embedded": [], "postgresql": []}
    try:
        for i in range(args.repeat):
            print(f"[{i + 1}/{args.repeat}] cp -r / replicate to embedded / to PostgreSQL ...",
                  file=sys.stderr)
            dst = work / "cp-dst"
            remove(dst)
            cache.prepare(src / "store")
            run = measure("cp -r", ["cp", "-r", str(src / "store"), str(dst)], log=log)
            check_ok(run, log)
            run.flush_seconds = timed_flush(["sync", "-f", str(dst)])
            runs["cp"].append(run)
            for kind in ("embedded", "postgresql"):
                dst = work / f"{kind}-dst"
                remove(dst)
                url = str(dst) if kind == "embedded" else f"{pg.new_database('bench')}?store={dst}"
                cache.prepare(src / "store", src / "catalog.sqlite")
                run = measure(f"replicate to {kind}", [*dv, "--db", str(src), "replicate", "--to", url,
                                                        "--whole", "--json"], env=env, log=log)
                check_ok(run, log)
                if stored(dv_report(run)) != nfiles:
                    raise SystemExit(f"replicate to {kind} stored {stored(dv_report(run))} of {nfiles}")
                run.stdout = ""
                runs[kind].append(run)
    finally:
        pg.stop()
    med = {k: median_run(v) for k, v in runs.items()}
    cp_mbs = payload / MB / med["cp"].seconds
    cp_sync_mbs = payload / MB / (med["cp"].seconds + med["cp"].flush_seconds)
    print(f"\n{nfiles} files, {payload / MB:.0f} MB, cache {cache.mode}, median of {args.repeat}, "
          f"load at end {os.getloadavg()[0]:.2f}")
    print(f"{'step':<28}{'seconds':>9}{'MB/s':>9}{'files/s':>9}{'vs cp -r':>10}{'vs cp+sync':>12}"
          f"{'peak MB':>9}")
    for name, run in (("cp -r store", med["cp"]), ("replicate -> embedded", med["embedded"]),
                      ("replicate -> PostgreSQL", med["postgresql"])):
        mbs = payload / MB / run.seconds
        print(f"{name:<28}{run.seconds:>9.2f}{mbs:>9.1f}{nfiles / run.seconds:>9.0f}{mbs / cp_mbs:>9.2f}x"
              f"{mbs / cp_sync_mbs:>11.2f}x{run.max_rss_mb:>9.0f}")
    print(f"(cp -r then needs {med['cp'].flush_seconds:.2f} s of sync -f to be durable)")
    if args.json_out:
        args.json_out.write_text(json.dumps({"files": nfiles, "payload": payload, "cache": cache.mode,
                                             "runs": {k: [asdict(r) for r in v] for k, v in runs.items()}},
                                            indent=1))
    print(f"work dir: {work} (remove when done); commands: {shlex.join(dv)} ...", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
