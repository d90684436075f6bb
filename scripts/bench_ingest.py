"""Ingest benchmark for `pacs serve` alone: quicker to iterate on than ../shared/bench.

Stores the bench's data sets with DCMTK's /usr/bin/storescu, like bench.py's
STORE-bulk (one association) and STORE-many (parallel associations) phases,
and prints instances/s plus the server's peak RSS. The data comes from
../shared/bench/gen_data.py (same parameters as bench.py, so the files are
byte-identical to what the side-by-side benchmark sends).

    python scripts/bench_ingest.py --bulk 300 --many 5000 --fsync true
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench"
STORESCU = "/usr/bin/storescu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_data(root: Path, bulk: int, many: int) -> tuple[Path, list[Path]]:
    sys.path.insert(0, str(BENCH))
    import gen_data

    bulk_params = gen_data.params_dict("bulk", 1, 1, 1, bulk, 512, 512, ["CT"], 1, 900000)
    many_params = gen_data.params_dict("many", -(-many // 50), 2, 5, 5, 64, 64,
                                       ["CT", "MR", "CR", "US"], 1, 0)
    out = []
    for name, params in (("bulk", bulk_params), ("many", many_params)):
        folder = root / f"{name}-{params['patients']}-{params['instances_per_series']}"
        gen_data.generate(str(folder), params, jobs=2)
        out.append(folder)
    bulk_patient, = (p for p in out[0].iterdir() if p.is_dir())
    patients = sorted(p for p in out[1].iterdir() if p.is_dir())
    return bulk_patient, patients


def wait_ready(port: int, timeout: float = 20) -> None:
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
        if assoc.is_established:
            assoc.release()
            return
        time.sleep(0.05)
    raise SystemExit("server not ready")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    """Worker processes of the supervisor (empty with network.workers: 1)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def store(groups: list[list[Path]], port: int) -> tuple[float, int]:
    """Run one storescu per group at once; return seconds and failed responses."""
    logs = [tempfile.TemporaryFile(mode="w+") for _ in groups]  # a full pipe would stall storescu
    start = time.perf_counter()
    procs = [
        subprocess.Popen([STORESCU, "-v", "-aec", "MINIPACS", "+sd", "+r", "127.0.0.1",
                          str(port), *map(str, group)],
                         stdout=log, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "TCP_NODELAY": "1"})  # as bench.py: DCMTK's Nagle off
        for group, log in zip(groups, logs)
    ]
    for proc in procs:
        proc.wait()
    elapsed = time.perf_counter() - start
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    failed = sum(out.count("Received Store Response (") - out.count("Received Store Response (Success")
                 for out in outputs)
    return elapsed, failed


def count_files(folders: list[Path]) -> int:
    return sum(len(files) for f in folders for _, _, files in os.walk(f))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bulk", type=int, default=300)
    parser.add_argument("--many", type=int, default=5000)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--fsync", choices=["true", "false"], default="true")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/pacs-bench-data"))
    args = parser.parse_args()
    bulk_dir, patients = make_data(args.data_dir, args.bulk, args.many)
    with tempfile.TemporaryDirectory(prefix="pacs-bench-") as work:
        port = free_port()
        config = Path(work) / "pacs.yaml"
        config.write_text(
            f"ae_title: MINIPACS\nhost: 127.0.0.1\nport: {port}\n"
            f"storage: {{root: data/store, fsync: {args.fsync}}}\n"
            'database: {url: "sqlite:///data/index.sqlite"}\n'
        )
        server = subprocess.Popen([sys.executable, "-m", "pacs", "serve", "--config", str(config)],
                                  start_new_session=True)
        try:
            wait_ready(port)
            for name, groups in (
                ("bulk", [[bulk_dir]]),
                ("many", [patients[i::args.parallel] for i in range(args.parallel)]),
            ):
                count = count_files([p for g in groups for p in g])
                seconds, failed = store(groups, port)
                print(f"STORE-{name}: {count} instances in {seconds:.2f} s = {count / seconds:.0f}"
                      f" inst/s, {len(groups)} assoc, fsync {args.fsync}, failed {failed}")
            workers = [peak_rss_mb(child) for child in children(server.pid)]
            print(f"peak RSS: main {peak_rss_mb(server.pid):.0f} MB, workers "
                  f"{', '.join(f'{w:.0f}' for w in workers) or '-'} MB")
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
