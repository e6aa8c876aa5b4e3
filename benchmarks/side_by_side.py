#!/usr/bin/env python3
"""dicomvault side by side with ``tar | zstd`` on the same generated data.

One run, on one data set of synthetic PET/CT/MR studies (generated with
benchmarks/synth.py when missing), times:

1. ``dicomvault import-dicom DATA`` into a fresh database (files/s, MB/s);
2. ``dicomvault export-db OUT.bkp --whole`` against
   ``tar c DATA | zstd -3 -T0`` (MB/s and compression ratio of both);
3. ``dicomvault import-db OUT.bkp`` into a fresh database against
   ``zstd -d | tar x``;

and the peak memory of each dicomvault run: the largest single process
(``ru_maxrss`` from ``wait4``, exact) and the whole process tree (the sum of
PSS over the process and its workers, sampled every 0.1 s). Then prints a
table with the ratios dicomvault / peer against the targets of issue 2, and
writes everything as JSON with ``--json-out``.

Fairness rules:
* Throughput is always payload bytes (the sum of the DICOM file sizes,
  1 MB = 10^6 bytes) over wall time, and the compression ratio is payload
  bytes over output bytes, for dicomvault and for the peer alike.
* Page cache: ``--cache cold`` syncs and drops the page cache before every
  timed run (needs a writable /proc/sys/vm/drop_caches); ``--cache warm``
  reads every input file once, untimed, before every timed run, for
  dicomvault and the peer alike; ``auto`` (default) picks cold when allowed.
* dicomvault fsyncs what it writes; the literal peer pipelines do not. The
  targets are judged against the literal pipelines (the stricter test);
  the time the peer then needs to make its output durable (``sync FILE`` /
  ``sync -f DIR``) is recorded beside it.

Examples::

    .venv/bin/python benchmarks/side_by_side.py                      # 1 GB under /tmp
    .venv/bin/python benchmarks/side_by_side.py --size 5GB --json-out /tmp/sbs-5g.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scriptutil import precompile

HERE = Path(__file__).resolve().parent
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
MB = 1e6
MIB = 1 << 20

# Targets from issue 2.
TARGET_INGEST_FILES_PER_S = 1000.0
TARGET_EXPORT_VS_PEER = 0.7
TARGET_PEAK_MEMORY_MB = 300.0
# The .bkp as a backup facility (issue 3): export-db and import-db at least as fast as the plain
# archive pipeline, and peak memory the same whatever the size (a run at another size, --baseline).
TARGET_BACKUP_VS_PEER = 1.0
TARGET_MEMORY_VS_BASELINE = 1.10  # "the same": at most 10% above the baseline run's peak


# ----------------------------------------------------------------------------- measuring
@dataclass
class Run:
    """One timed command."""

    name: str
    cmd: str
    seconds: float
    user_s: float
    sys_s: float
    max_rss_mb: float  # ru_maxrss of the largest single process (wait4)
    tree_peak_rss_mb: float  # sampled: sum of RSS over the process tree
    tree_peak_pss_mb: float  # sampled: sum of PSS over the process tree
    returncode: int
    foreign_cpu_s: float = 0.0  # CPU time others used on the machine meanwhile (/proc/stat minus ours)
    flush_seconds: float = 0.0  # peers: time to make the output durable afterwards
    stdout: str = field(default="", repr=False)


def cpu_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return (total - idle) / hz, total / hz


def wait_until_idle(max_wait: float, busy_below: float = 0.10) -> float:
    """Wait (up to ``max_wait`` seconds) until the machine's CPUs are less
    than ``busy_below`` busy over one second; returns the last busy share."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = cpu_busy_seconds()
        time.sleep(1.0)
        b1, t1 = cpu_busy_seconds()
        share = (b1 - b0) / max(t1 - t0, 1e-9)
        if share < busy_below or time.monotonic() >= deadline:
            return share


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(b")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree_memory(pid: int) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in KiB over ``pid`` and its descendants."""
    kids = _children_map()
    todo, rss, pss = [pid], 0, 0
    while todo:
        p = todo.pop()
        todo.extend(kids.get(p, ()))
        try:
            with open(f"/proc/{p}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            continue
    return rss, pss


def measure(name: str, argv: list[str] | str, *, shell: bool = False, env: dict[str, str] | None = None,
            log: Path | None = None) -> Run:
    """Run a command, wall-timed, sampling the memory of its process tree."""
    err = open(log, "ab") if log else subprocess.DEVNULL
    busy0, _ = cpu_busy_seconds()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, shell=shell, env=env, stdout=subprocess.PIPE, stderr=err,
                            executable="/bin/bash" if shell else None)
    peak = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            rss, pss = _tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read() if proc.stdout else b""  # type: ignore[union-attr]
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    busy1, _ = cpu_busy_seconds()
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log:
        err.close()  # type: ignore[union-attr]
    return Run(name=name, cmd=argv if isinstance(argv, str) else shlex.join(argv), seconds=seconds,
               user_s=usage.ru_utime, sys_s=usage.ru_stime, max_rss_mb=usage.ru_maxrss * 1024 / MB,
               tree_peak_rss_mb=peak[0] * 1024 / MB, tree_peak_pss_mb=peak[1] * 1024 / MB,
               returncode=proc.returncode, stdout=out.decode(errors="replace"),
               foreign_cpu_s=max(0.0, busy1 - busy0 - usage.ru_utime - usage.ru_stime))


def timed_flush(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- cache control
def can_drop_caches() -> bool:
    return os.access(DROP_CACHES, os.W_OK)


def drop_caches() -> None:
    os.sync()
    DROP_CACHES.write_text("3\n")


def warm(*paths: Path) -> None:
    """Read every file under ``paths`` once (into the page cache)."""
    for top in paths:
        files = [top] if top.is_file() else (p for p in top.rglob("*") if p.is_file())
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.read(4 * MIB):
                    pass


class Cache:
    """Puts the page cache in the same state before every timed run. In cold
    mode the interpreter and its libraries are read back right after the
    drop (``warm_code``, untimed) so that only the data is cold."""

    def __init__(self, mode: str, warm_code: list[str] | None = None, wait_idle: float = 0.0) -> None:
        self.warm_code = warm_code
        self.wait_idle = wait_idle
        self.busy_before: list[float] = []  # machine busy share seen just before each timed run
        if mode == "auto":
            mode = "cold" if can_drop_caches() else "warm"
        if mode == "cold" and not can_drop_caches():
            raise SystemExit(f"--cache cold needs a writable {DROP_CACHES} (run as root, outside a "
                             "read-only /proc), or use --cache warm")
        self.mode = mode

    def prepare(self, *inputs: Path) -> None:
        """Call before each timed run with the run's inputs."""
        if self.wait_idle > 0:
            self.busy_before.append(wait_until_idle(self.wait_idle))
        if self.mode == "cold":
            drop_caches()
            if self.warm_code:
                subprocess.run(self.warm_code, check=True, stdout=subprocess.DEVNULL)
        else:
            os.sync()  # no dirty pages of the previous step to flush during the timed run
            warm(*inputs)


# ----------------------------------------------------------------------------- helpers
def parse_size(text: str) -> int:
    sys.path.insert(0, str(HERE))
    from synth import parse_size as synth_parse_size  # the generator's own size syntax

    value = synth_parse_size(text)
    assert value is not None
    return value


def folder_stats(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def ensure_data(data: Path, size: str, seed: int) -> None:
    if (data / "synth.json").exists() and (data / "DICOM").is_dir():
        return
    print(f"generating {size} of synthetic studies (seed {seed}) in {data} ...", file=sys.stderr)
    remove(data)
    subprocess.run([sys.executable, str(HERE / "synth.py"), str(data), "--size", size, "--seed", str(seed)],
                   check=True)


def median_run(runs: list[Run]) -> Run:
    """The run with the median wall time (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r.seconds)
    return ordered[(len(ordered) - 1) // 2]


def check_ok(run: Run, log: Path) -> None:
    if run.returncode != 0:
        raise SystemExit(f"{run.name} failed with exit code {run.returncode}: {run.cmd}\n(see {log})")


def dv_report(run: Run) -> dict[str, Any]:
    try:
        return json.loads(run.stdout)  # type: ignore[no-any-return]
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{run.name}: no JSON report on stdout ({exc}): {run.stdout[:300]!r}") from exc


def stored(report: dict[str, Any]) -> int:
    return int(report.get("counts", {}).get("instance", {}).get("stored", 0))


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError):
        return "?"


# ----------------------------------------------------------------------------- the run
def run_all(args: argparse.Namespace) -> dict[str, Any]:
    data: Path = args.data
    ensure_data(data, args.size, args.seed)
    load_start = list(os.getloadavg())
    dicom = data / "DICOM"
    nfiles, payload = folder_stats(dicom)
    work: Path = args.work
    remove(work)
    work.mkdir(parents=True)
    log = work / "stderr.log"
    dv = shlex.split(args.dicomvault) if args.dicomvault else [sys.executable, "-m", "dicomvault"]
    cache = Cache(args.cache, warm_code=[*dv, "--version"], wait_idle=args.wait_idle)
    env = dict(os.environ)
    env.pop("DICOMVAULT_DB", None)
    print(f"data: {nfiles} files, {payload / MB:.1f} MB in {dicom}; work dir {work}; cache {cache.mode}; "
          f"{args.repeat} timed run(s) each", file=sys.stderr)

    def dicomvault(name: str, *a: str | Path) -> Run:
        run = measure(name, [*dv, *map(str, a), "--json"], env=env, log=log)
        check_ok(run, log)
        return run

    def peer(name: str, pipeline: str) -> Run:
        run = measure(name, "set -o pipefail; " + pipeline, shell=True, log=log)
        check_ok(run, log)
        return run

    steps = ("ingest", "export", "tar_zstd", "import", "unzstd_untar")
    results: dict[str, list[Run]] = {k: [] for k in steps}
    db = work / "db"
    bkp = work / "whole.bkp"
    tzst = work / "whole.tar.zst"
    for i in range(args.repeat):
        print(f"[{i + 1}/{args.repeat}] import-dicom ...", file=sys.stderr)
        remove(db)
        cache.prepare(dicom)
        run = dicomvault("import-dicom", "--db", db, "import-dicom", dicom)
        rep = dv_report(run)
        if stored(rep) != nfiles:
            raise SystemExit(f"import-dicom stored {stored(rep)} of {nfiles} files: {run.stdout[:500]}")
        results["ingest"].append(run)

    store = db / "store"
    for i in range(args.repeat):
        print(f"[{i + 1}/{args.repeat}] export-db / tar | zstd -3 -T0 ...", file=sys.stderr)
        remove(bkp)
        cache.prepare(store, db / "catalog.sqlite")
        run = dicomvault("export-db", "--db", db, "export-db", bkp, "--whole")
        if stored(dv_report(run)) != nfiles:
            raise SystemExit(f"export-db wrote {stored(dv_report(run))} of {nfiles} instances")
        run.stdout = ""
        results["export"].append(run)
        remove(tzst)
        cache.prepare(dicom)
        run = peer("tar | zstd -3 -T0", f"tar -C {shlex.quote(str(data))} -cf - DICOM | "
                                        f"zstd -3 -T0 -q -o {shlex.quote(str(tzst))}")
        run.flush_seconds = timed_flush(["sync", str(tzst)])
        results["tar_zstd"].append(run)
    bkp_bytes, tzst_bytes = bkp.stat().st_size, tzst.stat().st_size
    tar_stream_bytes = int(subprocess.run(f"zstd -dc -q {shlex.quote(str(tzst))} | wc -c", shell=True,
                                          capture_output=True, text=True, check=True).stdout)

    rdb = work / "restore-db"
    rtar = work / "restore-tar"
    for i in range(args.repeat):
        print(f"[{i + 1}/{args.repeat}] import-db / zstd -d | tar x ...", file=sys.stderr)
        remove(rdb)
        cache.prepare(bkp)
        run = dicomvault("import-db", "--db", rdb, "import-db", bkp)
        rep = dv_report(run)
        if stored(rep) != nfiles or int(rep.get("bytes", 0)) != payload:
            raise SystemExit(f"import-db restored {stored(rep)} instances, {rep.get('bytes')} bytes; "
                             f"expected {nfiles}, {payload}")
        run.stdout = ""
        results["import"].append(run)
        if not args.keep:
            remove(rdb)
        remove(rtar)
        rtar.mkdir()
        cache.prepare(tzst)
        run = peer("zstd -d | tar x", f"zstd -d -q -c {shlex.quote(str(tzst))} | "
                                      f"tar -C {shlex.quote(str(rtar))} -xf -")
        run.flush_seconds = timed_flush(["sync", "-f", str(rtar)])
        results["unzstd_untar"].append(run)
        if tree_bytes(rtar) != payload:
            raise SystemExit("zstd -d | tar x restored a different number of bytes")
        if not args.keep:
            remove(rtar)
    if not args.keep:
        for p in (db, rdb, rtar, bkp, tzst):
            remove(p)

    med = {k: median_run(v) for k, v in results.items()}
    ing, exp, tz, imp, ut = (med[k] for k in ("ingest", "export", "tar_zstd", "import", "unzstd_untar"))
    figures = {
        "ingest_files_per_s": nfiles / ing.seconds,
        "ingest_mb_per_s": payload / MB / ing.seconds,
        "export_mb_per_s": payload / MB / exp.seconds,
        "export_ratio": payload / bkp_bytes,
        "tar_zstd_mb_per_s": payload / MB / tz.seconds,
        "tar_zstd_mb_per_s_with_fsync": payload / MB / (tz.seconds + tz.flush_seconds),
        "tar_zstd_ratio": payload / tzst_bytes,
        "tar_zstd_ratio_of_tar_stream": tar_stream_bytes / tzst_bytes,
        "import_mb_per_s": payload / MB / imp.seconds,
        "import_files_per_s": nfiles / imp.seconds,
        "unzstd_untar_mb_per_s": payload / MB / ut.seconds,
        "unzstd_untar_mb_per_s_with_syncfs": payload / MB / (ut.seconds + ut.flush_seconds),
    }
    figures["export_vs_peer"] = figures["export_mb_per_s"] / figures["tar_zstd_mb_per_s"]
    figures["export_ratio_vs_peer"] = figures["export_ratio"] / figures["tar_zstd_ratio"]
    figures["import_vs_peer"] = figures["import_mb_per_s"] / figures["unzstd_untar_mb_per_s"]
    # Each dicomvault run is followed by its peer run, so the two of a pair
    # saw about the same load from other users: the median of the paired
    # ratios is steadier than the ratio of the medians on a shared machine.
    figures["export_vs_peer_paired"] = statistics.median(
        t.seconds / e.seconds for e, t in zip(results["export"], results["tar_zstd"], strict=True))
    figures["import_vs_peer_paired"] = statistics.median(
        t.seconds / i.seconds for i, t in zip(results["import"], results["unzstd_untar"], strict=True))
    for key, runs in results.items():  # CPU seconds (user + sys, the whole process tree), median
        figures[f"{key}_cpu_s"] = statistics.median(r.user_s + r.sys_s for r in runs)
    dv_runs = {"import-dicom": ing, "export-db": exp, "import-db": imp}
    memory = {k: {"max_rss_mb": r.max_rss_mb, "tree_peak_pss_mb": r.tree_peak_pss_mb,
                  "tree_peak_rss_mb": r.tree_peak_rss_mb} for k, r in dv_runs.items()}
    peak_tree = max(max(r.tree_peak_pss_mb, r.max_rss_mb) for rs in results.values() for r in rs
                    if r.name in dv_runs)
    verdicts = {
        "ingest_files_per_s": figures["ingest_files_per_s"] >= TARGET_INGEST_FILES_PER_S,
        "export_throughput_vs_peer": figures["export_vs_peer"] >= TARGET_EXPORT_VS_PEER,
        "export_ratio_no_worse": figures["export_ratio"] >= figures["tar_zstd_ratio"],
        "peak_memory": peak_tree < TARGET_PEAK_MEMORY_MB,
        "backup_export_vs_peer": figures["export_vs_peer"] >= TARGET_BACKUP_VS_PEER,
        "backup_import_vs_peer": figures["import_vs_peer"] >= TARGET_BACKUP_VS_PEER,
    }
    baseline = None
    if args.baseline is not None:  # the same steps at another size: is peak memory the same?
        base = json.loads(args.baseline.read_text())
        baseline = {"size_arg": base["data"]["size_arg"], "files": base["data"]["files"],
                    "memory_mb": base["memory_mb"],
                    "ratios": {k: memory[k]["max_rss_mb"] / base["memory_mb"][k]["max_rss_mb"]
                               for k in memory}}
        verdicts["memory_same_as_baseline"] = all(r <= TARGET_MEMORY_VS_BASELINE
                                                  for r in baseline["ratios"].values())
    import pydicom
    import zstandard

    import dicomvault

    return {
        "label": args.label,
        "dicomvault_module": str(Path(dicomvault.__file__).parent),
        "loadavg_start": load_start,
        "loadavg_end": list(os.getloadavg()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "cpu": _cpu_model(), "python": platform.python_version(),
                    "dicomvault": dicomvault.__version__, "pydicom": pydicom.__version__,
                    "zstandard": zstandard.__version__, "zstd_cli": tool_version(["zstd", "--version"]),
                    "tar": tool_version(["tar", "--version"])},
        "data": {"path": str(dicom), "files": nfiles, "bytes": payload, "size_arg": args.size,
                 "seed": args.seed, "mean_file_bytes": payload / nfiles,
                 "tar_stream_bytes": tar_stream_bytes},
        "cache": cache.mode,
        "machine_busy_before_runs": cache.busy_before,
        "repeat": args.repeat,
        "outputs": {"bkp_bytes": bkp_bytes, "tar_zst_bytes": tzst_bytes},
        "figures": figures,
        "memory_mb": memory,
        "peak_memory_mb": peak_tree,
        "baseline": baseline,
        "targets": {"ingest_files_per_s": TARGET_INGEST_FILES_PER_S,
                    "export_vs_peer": TARGET_EXPORT_VS_PEER, "peak_memory_mb": TARGET_PEAK_MEMORY_MB},
        "verdicts": verdicts,
        "runs": {k: [{kk: vv for kk, vv in asdict(r).items() if kk != "stdout"} for r in v]
                 for k, v in results.items()},
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


# ----------------------------------------------------------------------------- output
def table(res: dict[str, Any]) -> str:
    f, m, v, d = res["figures"], res["memory_mb"], res["verdicts"], res["data"]

    def ok(flag: bool) -> str:
        return "PASS" if flag else "FAIL"

    rows = [
        ("step", "dicomvault", "peer", "dv / peer", "target", ""),
        ("ingest (import-dicom)", f"{f['ingest_files_per_s']:,.0f} files/s", "-", "-",
         f">= {TARGET_INGEST_FILES_PER_S:,.0f} files/s", ok(v["ingest_files_per_s"])),
        ("", f"{f['ingest_mb_per_s']:.0f} MB/s, {f['ingest_cpu_s']:.1f} CPU s", "", "", "", ""),
        ("export-db vs tar|zstd -3 -T0", f"{f['export_mb_per_s']:.0f} MB/s",
         f"{f['tar_zstd_mb_per_s']:.0f} MB/s",
         f"{f['export_vs_peer']:.2f}x", f">= {TARGET_EXPORT_VS_PEER}x", ok(v["export_throughput_vs_peer"])),
        ("  as a backup (issue 3)", "", "", f"{f['export_vs_peer']:.2f}x", f">= {TARGET_BACKUP_VS_PEER}x",
         ok(v["backup_export_vs_peer"])),
        ("  compression ratio", f"{f['export_ratio']:.3f}", f"{f['tar_zstd_ratio']:.3f}",
         f"{f['export_ratio_vs_peer']:.3f}x", ">= 1.00x", ok(v["export_ratio_no_worse"])),
        ("  paired runs (median of ratios)", "", "", f"{f['export_vs_peer_paired']:.2f}x", "(info)", ""),
        ("  CPU seconds (user+sys)", f"{f['export_cpu_s']:.1f} s", f"{f['tar_zstd_cpu_s']:.1f} s",
         f"{f['export_cpu_s'] / f['tar_zstd_cpu_s']:.2f}x", "(info)", ""),
        ("  peer + fsync of its output", "", f"{f['tar_zstd_mb_per_s_with_fsync']:.0f} MB/s",
         f"{f['export_mb_per_s'] / f['tar_zstd_mb_per_s_with_fsync']:.2f}x", "(info)", ""),
        ("import-db vs zstd -d|tar x", f"{f['import_mb_per_s']:.0f} MB/s",
         f"{f['unzstd_untar_mb_per_s']:.0f} MB/s",
         f"{f['import_vs_peer']:.2f}x", f">= {TARGET_BACKUP_VS_PEER}x", ok(v["backup_import_vs_peer"])),
        ("", f"{f['import_files_per_s']:,.0f} files/s", "", "", "", ""),
        ("  paired runs (median of ratios)", "", "", f"{f['import_vs_peer_paired']:.2f}x", "(info)", ""),
        ("  CPU seconds (user+sys)", f"{f['import_cpu_s']:.1f} s", f"{f['unzstd_untar_cpu_s']:.1f} s",
         f"{f['import_cpu_s'] / f['unzstd_untar_cpu_s']:.2f}x", "(info)", ""),
        ("  peer + syncfs of its output", "", f"{f['unzstd_untar_mb_per_s_with_syncfs']:.0f} MB/s",
         f"{f['import_mb_per_s'] / f['unzstd_untar_mb_per_s_with_syncfs']:.2f}x", "(info)", ""),
    ]
    for name, mem in m.items():
        rows.append((f"peak memory {name}", f"{mem['max_rss_mb']:.0f} MB max RSS",
                     f"{mem['tree_peak_pss_mb']:.0f} MB tree PSS", "", f"< {TARGET_PEAK_MEMORY_MB:.0f} MB",
                     ok(max(mem["max_rss_mb"], mem["tree_peak_pss_mb"]) < TARGET_PEAK_MEMORY_MB)))
        b = res.get("baseline")
        if b:
            rows.append((f"  vs {b['size_arg']} ({b['files']:,} files)", f"{mem['max_rss_mb']:.0f} MB",
                         f"{b['memory_mb'][name]['max_rss_mb']:.0f} MB", f"{b['ratios'][name]:.2f}x",
                         f"<= {TARGET_MEMORY_VS_BASELINE:.2f}x",
                         ok(b["ratios"][name] <= TARGET_MEMORY_VS_BASELINE)))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = [f"dicomvault side by side: {d['files']:,} files, {d['bytes'] / MB:,.0f} MB "
             f"(mean {d['mean_file_bytes'] / 1e3:.0f} KB), {res['machine']['cpus']} CPUs, "
             f"cache {res['cache']}, "
             f"median of {res['repeat']} run(s)" + (f"; {res['label']}" if res["label"] else "")]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("MB = 10^6 bytes of DICOM payload; ratio = payload / output bytes; memory: largest process "
                 "(wait4 ru_maxrss) and whole process tree (sampled PSS sum).")
    foreign = {k: max(r["foreign_cpu_s"] / max(r["seconds"], 1e-9) for r in v)
               for k, v in res["runs"].items()}
    lines.append(f"load average at start / end: {res['loadavg_start'][0]:.2f} / {res['loadavg_end'][0]:.2f}; "
                 "worst CPU use by others during a timed run (cores): "
                 + ", ".join(f"{k} {v:.2f}" for k, v in foreign.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    precompile()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GB", help="size of the generated data (default 1GB; e.g. 5GB)")
    ap.add_argument("--seed", type=int, default=1, help="generator seed (default 1)")
    ap.add_argument("--data", type=Path, help="data folder, generated when missing "
                    "(default /tmp/dicomvault-bench/synth-SIZE-seedSEED)")
    ap.add_argument("--work", type=Path, help="scratch folder for databases and archives, emptied first "
                    "(default /tmp/dicomvault-bench/work-SIZE)")
    ap.add_argument("--cache", choices=["auto", "cold", "warm"], default="auto",
                    help="page cache before each timed run (default auto: cold when allowed)")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per step; the median is reported")
    ap.add_argument("--baseline", type=Path, metavar="JSON",
                    help="the --json-out of a run at another size: peak memory is compared with it "
                         "(the same, within 10%%, is the target)")
    ap.add_argument("--dicomvault", help="command to run dicomvault (default: this python -m dicomvault)")
    ap.add_argument("--json-out", type=Path, help="write the results as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep databases, archives and restored folders")
    ap.add_argument("--wait-idle", type=float, default=60.0, metavar="SECONDS",
                    help="before each timed run, wait up to this long for the machine's CPUs to be at "
                    "least 90%% idle (shared machines; 0 = do not wait; default 60)")
    ap.add_argument("--label", default="", help="free text stored with the results (e.g. the commit)")
    args = ap.parse_args(argv)
    parse_size(args.size)  # validate early
    base = Path("/tmp/dicomvault-bench")
    args.data = args.data or base / f"synth-{args.size}-seed{args.seed}"
    args.work = args.work or base / f"work-{args.size}"
    for tool in ("tar", "zstd", "sync"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is not installed")
    res = run_all(args)
    print(table(res))
    if args.json_out:
        args.json_out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"results written to {args.json_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
