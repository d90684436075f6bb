"""C-GET of one CT series: `pacs serve` against Orthanc and dcmqrscp (issue 4's speed clause).

../shared/bench/bench.py times C-MOVE only. This starts its servers the same
way (its server classes, ports from its range, TCP_NODELAY=1 for every DCMTK
process, memory sampled from /proc), loads each with the bench's 300-CT series
(../shared/bench/gen_data.py, 512x512 16-bit, as bench_ingest.py makes it) over
one /usr/bin/storescu association, then runs `/usr/bin/getscu` (Study Root,
SERIES level) against each target in turn, rotating the order each round. A
retrieve is timed from starting getscu until it exits (process start and
association set-up included, the same for every target; one untimed retrieve
per target comes first, as the first is slower for all), and it counts only if
getscu exits 0 and exactly the series' files arrived. getscu writes them into a
fresh folder in --out-root (default /tmp, on disk, no fsync; /dev/shm takes the
disk's noise out but keeps the client's file writes), with `--mode -B` (getscu's
default: each data set received in memory, then written) or `+B` (written as it
arrives); `--mode ignore` discards them (then the count is its "Received C-STORE
Request" log lines). The `pacs` target runs this worktree's code (PYTHONPATH).

    python scripts/bench_get.py --rounds 9 --out-root /dev/shm
    python scripts/bench_get.py --rounds 9 --mode ignore
    python scripts/bench_get.py --targets pacs --rounds 50   # attach py-spy to the logged pid
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT.parent / "shared" / "bench"
sys.path.insert(0, str(BENCH))
import bench  # noqa: E402
import gen_data  # noqa: E402

GETSCU = "/usr/bin/getscu"
TARGETS = ("pacs", "orthanc", "dcmqrscp")


def bulk_series(data_dir: Path, count: int) -> dict:
    """The bulk CT series (generated once, then reused) as a bench manifest."""
    params = gen_data.params_dict("bulk", 1, 1, 1, count, 512, 512, ["CT"], 1, 900000)
    folder = data_dir / f"bulk-1-{count}"
    manifest = gen_data.generate(str(folder), params, jobs=2)
    manifest["patient_dirs"] = sorted(str(p) for p in folder.iterdir() if p.is_dir())
    return manifest


def start(name: str, args: argparse.Namespace, work_root: Path, running: dict) -> None:
    """Start target `name` (registered in `running` at once, so it is always stopped)."""
    workdir = tempfile.mkdtemp(prefix=f"bench-get-{name}-", dir=work_root)
    ports = bench.alloc_ports(3, args.port_min, args.port_max)
    cls, variant = bench.SERVER_CLASSES[name]
    server = cls(workdir, ports[0], ports[1], ports[2:], args, variant)
    running[name] = server
    server.start()


def load(server, manifest: dict, timeout: float) -> None:
    """Store the series over one storescu association, as bench.py's STORE-bulk."""
    stored = bench.store_workload(manifest, 1, server, server.workdir, "bulk", timeout)
    if not stored["ok"]:
        raise SystemExit(f"{server.name}: loading the series failed: {stored['first_error']}")
    bench.log(f"{server.name}: loaded {stored['stored']} instances ({stored['mb_per_s']} MB/s), "
              f"port {server.port}, pid {server.proc.pid}")


def get_series(server, study: str, series: str, out: Path, mode: str) -> tuple[float, int]:
    """One C-GET of the series with getscu: seconds, and the instances received."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    ignore = mode == "ignore"
    storage = ["--ignore", "-v"] if ignore else [mode, "-od", str(out)]
    cmd = [GETSCU, "-S", "-aet", bench.SCU_AET, "-aec", server.aet, *storage,
           "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study}",
           "-k", f"SeriesInstanceUID={series}", bench.HOST, str(server.port)]
    with tempfile.TemporaryFile(mode="w+") as log:  # a full pipe would stall getscu
        began = time.perf_counter()
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT,
                               env=bench.tool_env(bench.ARGS))
        seconds = time.perf_counter() - began
        log.seek(0)
        text = log.read()
    if code != 0:
        raise SystemExit(f"{server.name}: getscu exited {code}:\n{text[-2000:]}")
    received = text.count("Received C-STORE Request") if ignore else len(os.listdir(out))
    return seconds, received


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--rounds", type=int, default=3, help="retrieves per target")
    parser.add_argument("--bulk", type=int, default=300)
    parser.add_argument("--mode", choices=["-B", "+B", "ignore"], default="-B",
                        help="getscu's storage mode (default -B, its own default)")
    parser.add_argument("--pacs-cmd", default=f"{sys.executable} -m pacs")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/pacs-bench-data"))
    parser.add_argument("--work-root", type=Path, default=Path("/tmp"), help="servers' folders")
    parser.add_argument("--out-root", type=Path, default=Path("/tmp"), help="getscu's output")
    args = parser.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    # bench.py's own defaults for everything its server classes and helpers read
    bench.ARGS = server_args = bench.parse_args(["--pacs-cmd", args.pacs_cmd])
    bench.nodelay.patch()  # its readiness C-ECHO client, as bench.py does
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                             os.environ.get("PYTHONPATH")]))
    manifest = bulk_series(args.data_dir, args.bulk)
    bench.prewarm(manifest)
    study = manifest["patients"][0]["studies"][0]
    study_uid, series_uid = study["uid"], study["series"][0]["uid"]
    megabytes = manifest["bytes"] / 1e6
    running, samplers, times = {}, {}, {t: [] for t in targets}
    out = None
    try:
        for name in targets:
            start(name, server_args, args.work_root, running)
            samplers[name] = bench.TreeSampler(running[name].proc.pid)
            samplers[name].start()
            load(running[name], manifest, server_args.store_timeout)
            samplers[name].mark()  # the GET figure below is the tree's peak after loading
        out = Path(tempfile.mkdtemp(prefix="bench-get-out-", dir=args.out_root))
        for name in targets:  # untimed: the first retrieve of each is slower for all
            get_series(running[name], study_uid, series_uid, out, args.mode)
        for number in range(args.rounds):
            order = targets[number % len(targets):] + targets[:number % len(targets)]
            for name in order:
                seconds, received = get_series(running[name], study_uid, series_uid, out,
                                               args.mode)
                if received != manifest["files"]:
                    raise SystemExit(f"{name}: received {received} of {manifest['files']}")
                times[name].append(seconds)
                bench.log(f"round {number + 1} {name}: {seconds:.2f} s, "
                          f"{megabytes / seconds:.0f} MB/s")
        print(f"\nC-GET of {manifest['files']} CT 512x512 ({megabytes:.0f} MB) with getscu "
              f"{'--ignore' if args.mode == 'ignore' else f'{args.mode} into {args.out_root}'}"
              f", median of {args.rounds}; "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
        print("| target | s | inst/s | MB/s | peak RSS: main, largest child (VmHWM) "
              "| tree RSS peak in GET |")
        print("|---|---|---|---|---|---|")
        for name in targets:
            seconds = statistics.median(times[name])
            memory = samplers[name].mark()
            print(f"| {name} | {seconds:.3f} | {manifest['files'] / seconds:.0f} | "
                  f"{megabytes / seconds:.0f} | {memory['main_hwm_mb']:.0f} MB, "
                  f"{samplers[name].child_hwm_kb / 1024:.0f} MB | "
                  f"{memory['phase_tree_rss_peak_mb']:.0f} MB |")
    finally:
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
        for sampler in samplers.values():
            sampler.stop()
        for server in running.values():
            server.stop()
            shutil.rmtree(server.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
