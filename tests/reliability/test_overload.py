"""Overload: more associations than allowed, peers that stall, and a load of stores and queries."""
from __future__ import annotations

import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from tests.conftest import DCMTK, needs_dcmtk
from tests.dicomgen import make_instance, uid, write
from tests.reliability.conftest import scale
from tests.reliability.raw import associate_rq, connect, echo_pdata, establish
from tests.reliability.support import echo_ok, find_uids, proc_status, verify_problems
from tests.test_workers import children

LIMIT = 3
REJECTED_TRANSIENT, SERVICE_PROVIDER_PRESENTATION, LOCAL_LIMIT_EXCEEDED = 2, 3, 2


def open_association(port: int):
    """(association, the A-ASSOCIATE-RJ result/source/diagnostic or None)."""
    answers = []
    ae = AE(ae_title="CROWD")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS",
                         evt_handlers=[(evt.EVT_ACSE_RECV, lambda e: answers.append(e.primitive))])
    rejection = next(((a.result, a.result_source, a.diagnostic) for a in answers
                      if a.result not in (None, 0)), None)
    return assoc, rejection


@pytest.mark.parametrize("workers", [1, 2])
def test_extra_associations_are_rejected_and_admitted_ones_finish(serve_process, workers):
    """network.max_associations counts per worker process: `workers` x LIMIT are admitted."""
    proc = serve_process(network={"workers": workers, "max_associations": LIMIT})
    admitted_limit = workers * LIMIT
    tries = [open_association(proc.port) for _ in range(admitted_limit + 2)]
    admitted = [assoc for assoc, _ in tries if assoc.is_established]
    assert len(admitted) == admitted_limit
    assert [rejection for assoc, rejection in tries if not assoc.is_established] == [
        (REJECTED_TRANSIENT, SERVICE_PROVIDER_PRESENTATION, LOCAL_LIMIT_EXCEEDED)] * 2
    for n, assoc in enumerate(admitted):
        batch = [make_instance(patient_id=f"ADM{n}", number=i + 1) for i in range(10)]
        assert [assoc.send_c_store(ds).Status for ds in batch] == [0] * 10
        assoc.release()
    # The slots are free again (the supervisor learns of closed ones asynchronously).
    deadline = time.monotonic() + 30
    while True:
        again, rejection = open_association(proc.port)
        if again.is_established or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert again.is_established, rejection
    again.release()
    assert verify_problems(proc.config_path) == []


def partial_associate(sock: socket.socket) -> None:
    """Half an A-ASSOCIATE-RQ, then nothing."""
    rq = associate_rq()
    sock.sendall(rq[: len(rq) // 2])


STALLS = {
    "sends nothing": lambda sock: None,
    "stops mid A-ASSOCIATE-RQ": partial_associate,
    "stops mid P-DATA": lambda sock: sock.sendall(echo_pdata()[:20]),
}


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("stall", STALLS)
def test_stalled_peer_is_closed_and_frees_its_slot(serve_process, stall, workers):
    """One stalled peer per worker fills every slot (max_associations: 1 per worker)."""
    proc = serve_process(network={"max_associations": 1, "acse_timeout": 2, "network_timeout": 2,
                                  "workers": workers})
    socks = []
    try:
        for _ in range(workers):
            socks.append(establish(proc.port, timeout=60) if stall == "stops mid P-DATA"
                         else connect(proc.port, 60))
            STALLS[stall](socks[-1])
        held, rejection = open_association(proc.port)
        assert not held.is_established and rejection == (
            REJECTED_TRANSIENT, SERVICE_PROVIDER_PRESENTATION, LOCAL_LIMIT_EXCEEDED)
        for sock in socks:
            try:
                while sock.recv(65536):  # an A-ABORT may come first; then the close
                    pass
            except ConnectionResetError:
                pass
            except TimeoutError:
                pytest.fail("the node held the stalled connection for 60 s")
    finally:
        for sock in socks:
            sock.close()
    deadline = time.monotonic() + 10  # the node frees the slot right after closing
    while not echo_ok(proc.port, slot_wait=0):
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.1)


def find_loop(port: int, stop: threading.Event, patient_ids: list[str]) -> list[int]:
    """DCMTK findscu, 10 study queries per association, until stopped; answered counts."""
    answered = []
    n = 0
    while not stop.is_set():
        n += 1
        result = subprocess.run(
            [str(DCMTK / "findscu"), "-v", "-S", "-aec", "MINIPACS", "--repeat", "10",
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={patient_ids[n % len(patient_ids)]}",
             "-k", "StudyInstanceUID", "-k", "NumberOfStudyRelatedInstances",
             "127.0.0.1", str(port)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        answered.append(result.stderr.count("Received Final Find Response (Success)"))
    return answered


def store_folder(port: int, folder: Path) -> int:
    """DCMTK storescu sends a folder on one association; how many were answered Success."""
    result = subprocess.run([str(DCMTK / "storescu"), "-v", "-aec", "MINIPACS", "+sd", "+r",
                             "127.0.0.1", str(port), str(folder)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stderr.count("Received Store Response (Success)")


@needs_dcmtk
def test_load_stores_all_land_and_queries_answer(serve_process, tmp_path):
    """16 associations storing while 4 others query in a loop; peak RSS is printed.

    The clients are DCMTK's: pynetdicom 3.0's requestor loses a response now and
    then under load (its reactor thread can take the C-STORE-RSP off the queue
    the waiting send_c_store reads; see the README), which is not the node's doing.
    """
    storers, finders, each = 16, 4, scale(200, 1000)
    proc = serve_process(network={"workers": 2})
    sent = []
    for n in range(storers):
        study = uid("load", n)
        for i in range(each):
            ds = make_instance(patient_id=f"LOAD{n}", study=study, series=uid(study, "s", i // 100),
                               sop=uid("load", n, "sop", i), number=i + 1)
            write(ds, tmp_path / "in" / str(n) / f"{i}.dcm")
            sent.append(str(ds.SOPInstanceUID))
    patient_ids = [f"LOAD{n}" for n in range(storers)]
    stop = threading.Event()
    started = time.monotonic()
    with ThreadPoolExecutor(storers + finders) as pool:
        finding = [pool.submit(find_loop, proc.port, stop, patient_ids) for _ in range(finders)]
        storing = [pool.submit(store_folder, proc.port, tmp_path / "in" / str(n))
                   for n in range(storers)]
        try:
            acked = [future.result() for future in storing]
        finally:
            stop.set()
        answered = [future.result() for future in finding]
    elapsed = time.monotonic() - started
    assert acked == [each] * storers
    assert all(runs and runs == [10] * len(runs) for runs in answered), answered
    assert len(find_uids(proc.port, sent)) == storers * each
    workers = sorted(children(proc.proc.pid))
    peaks = {pid: proc_status(pid, "VmHWM") // 1024 for pid in [proc.proc.pid, *workers]}
    print(f"load: {storers}x{each} stores in {elapsed:.1f} s while {finders} associations at a "
          f"time ran {10 * sum(map(len, answered))} C-FINDs; peak RSS MB: supervisor "
          f"{peaks[proc.proc.pid]}, workers {[peaks[pid] for pid in workers]}")
    assert verify_problems(proc.config_path) == []
