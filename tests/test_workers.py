"""`pacs serve` with several worker processes behind one port (pacs/supervisor.py)."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from tests.conftest import run_pacs
from tests.dicomgen import make_study


def children(pid: int) -> set[int]:
    """PIDs whose parent is `pid` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def store_all(port: int, datasets: list) -> list[int]:
    ae = AE(ae_title="WORKERTEST")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
    assert assoc.is_established
    statuses = [assoc.send_c_store(ds).Status for ds in datasets]
    assoc.release()
    return statuses


def echo(port: int) -> int:
    ae = AE(ae_title="WORKERTEST")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
    assert assoc.is_established
    status = assoc.send_c_echo().Status
    assoc.release()
    return status


def wait_for(predicate, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_parallel_stores_land_once_across_workers(serve_process):
    proc = serve_process(network={"workers": 2})
    assert wait_for(lambda: len(children(proc.proc.pid)) == 2)
    studies = [make_study(patient_id=f"W{i}", series=2, per_series=10) for i in range(4)]
    results: dict[int, list[int]] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, store_all(proc.port, studies[i])))
               for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(results[i] == [0] * 20 for i in range(4))
    workers = children(proc.proc.pid)
    assert proc.terminate() == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    stats = run_pacs("stats", config=proc.config_path)
    assert "instances: 80" in stats.stdout.splitlines()
    assert "studies: 4" in stats.stdout.splitlines()
    assert "patients: 4" in stats.stdout.splitlines()


def test_dead_worker_is_replaced(serve_process):
    proc = serve_process(network={"workers": 2})
    assert wait_for(lambda: len(children(proc.proc.pid)) == 2)
    victim = min(children(proc.proc.pid))
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: victim not in children(proc.proc.pid)
                    and len(children(proc.proc.pid)) == 2)
    # Both the survivor and the replacement answer: several echoes spread over them.
    assert wait_for(lambda: all(echo(proc.port) == 0 for _ in range(4)))
    assert "exited" in proc.log_text() and "restarting" in proc.log_text()
    assert proc.terminate() == 0
