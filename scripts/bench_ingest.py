"""Ingest benchmark for `pacs serve` alone: quicker to iterate on than ../shared/bench.

Stores the bench's data sets with DCMTK's /usr/bin/storescu, like bench.py's
STORE-bulk (one association) and STORE-many (parallel associations) phases,
and prints instances/s plus the server's peak RSS. The data comes from
../shared/bench/gen_data.py (same parameters as bench.py, so the files are
byte-identical to what the side-by-side benchmark sends).

The index is SQLite unless `--database-url` names a PostgreSQL database; each
run then gets a new schema of its own (dropped afterwards), so runs start
equally empty. `--nodes N` (PostgreSQL only) starts N `pacs serve` processes
on one storage root and one schema, and spreads the STORE-many senders over
them round-robin (STORE-bulk goes to the first); the totals cover all nodes.

    python scripts/bench_ingest.py --bulk 300 --many 5000 --fsync true
    python scripts/bench_ingest.py --database-url postgresql://postgres@127.0.0.1/test --nodes 2
"""
from __future__ import annotations

import argparse
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from pynetdicom import AE
from pynetdicom.sop_class import Verification

BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench"
STORESCU = "/usr/bin/storescu"
SQLITE_URL = "sqlite:///data/index.sqlite"  # beside the store, in the run's folder


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


@contextmanager
def fresh_schema(url: str) -> Iterator[str]:
    """For a PostgreSQL URL: the URL of a new empty schema, dropped at the end."""
    import psycopg2

    schema = f"bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(url)
    admin.autocommit = True
    try:
        admin.cursor().execute(f'CREATE SCHEMA "{schema}"')
        yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"
    finally:
        admin.cursor().execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.close()


@contextmanager
def run_nodes(work: Path, count: int, database_url: str,
              fsync: str) -> Iterator[tuple[list[int], list[int]]]:
    """`count` `pacs serve` processes on one store and index; once all answer, their ports
    and the PIDs of all their processes (supervisors and workers)."""
    ports = [free_port() for _ in range(count)]
    servers = []
    try:
        for number, port in enumerate(ports):
            config = work / f"pacs{number}.yaml"
            config.write_text(
                f"ae_title: MINIPACS\nhost: 127.0.0.1\nport: {port}\n"
                f"storage: {{root: {work / 'data' / 'store'}, fsync: {fsync}}}\n"
                f'database: {{url: "{database_url}"}}\n'
            )
            servers.append(subprocess.Popen(
                [sys.executable, "-m", "pacs", "serve", "--config", str(config)],
                start_new_session=True))
        for port in ports:
            wait_ready(port)
        yield ports, [pid for s in servers for pid in (s.pid, *children(s.pid))]
        for number, server in enumerate(servers):
            workers = [peak_rss_mb(child) for child in children(server.pid)]
            print(f"peak RSS node {number}: main {peak_rss_mb(server.pid):.0f} MB, workers "
                  f"{', '.join(f'{w:.0f}' for w in workers) or '-'} MB")
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGTERM)
        for server in servers:
            server.wait(30)


def store(groups: list[list[Path]], ports: list[int]) -> tuple[float, int]:
    """Run one storescu per group at once, group i to ports[i]; return seconds and failed
    responses."""
    logs = [tempfile.TemporaryFile(mode="w+") for _ in groups]  # a full pipe would stall storescu
    start = time.perf_counter()
    procs = [
        subprocess.Popen([STORESCU, "-v", "-aec", "MINIPACS", "+sd", "+r", "127.0.0.1",
                          str(port), *map(str, group)],
                         stdout=log, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "TCP_NODELAY": "1"})  # as bench.py: DCMTK's Nagle off
        for group, port, log in zip(groups, ports, logs)
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


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds these processes have used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        user, system = user + int(fields[11]) / tick, system + int(fields[12]) / tick
    return user, system


def count_files(folders: list[Path]) -> int:
    return sum(len(files) for f in folders for _, _, files in os.walk(f))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bulk", type=int, default=300)
    parser.add_argument("--many", type=int, default=5000)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--fsync", choices=["true", "false"], default="true")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/pacs-bench-data"))
    parser.add_argument("--database-url", default=SQLITE_URL,
                        help="the index: SQLite (default) or postgresql://... (a new schema per run)")
    parser.add_argument("--nodes", type=int, default=1,
                        help="pacs serve processes sharing the store and index (PostgreSQL only)")
    args = parser.parse_args()
    postgres = args.database_url.startswith(("postgresql://", "postgres://"))
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    if args.nodes > 1 and not postgres:
        parser.error("--nodes above 1 needs a postgresql:// --database-url")
    bulk_dir, patients = make_data(args.data_dir, args.bulk, args.many)
    index = fresh_schema(args.database_url) if postgres else nullcontext(args.database_url)
    with tempfile.TemporaryDirectory(prefix="pacs-bench-") as work, index as database_url, \
            run_nodes(Path(work), args.nodes, database_url, args.fsync) as (ports, pids):
        for name, groups in (
            ("bulk", [[bulk_dir]]),
            ("many", [patients[i::args.parallel] for i in range(args.parallel)]),
        ):
            count = count_files([p for g in groups for p in g])
            server_before = cpu_seconds(pids)
            clients_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            seconds, failed = store(groups, [ports[i % len(ports)] for i in range(len(groups))])
            server = [b - a for a, b in zip(server_before, cpu_seconds(pids))]
            clients = resource.getrusage(resource.RUSAGE_CHILDREN)
            clients = (clients.ru_utime - clients_before.ru_utime,
                       clients.ru_stime - clients_before.ru_stime)
            print(f"STORE-{name}: {count} instances in {seconds:.2f} s = {count / seconds:.0f}"
                  f" inst/s, {len(groups)} assoc, {min(len(groups), len(ports))} node(s), "
                  f"{'PostgreSQL' if postgres else 'SQLite'}, fsync {args.fsync}, failed {failed}")
            print(f"  CPU ms per instance: server {1000 * server[0] / count:.2f} user + "
                  f"{1000 * server[1] / count:.2f} system, storescu {1000 * clients[0] / count:.2f}"
                  f" user + {1000 * clients[1] / count:.2f} system")
    return 0


if __name__ == "__main__":
    sys.exit(main())
