"""Clients and probes shared by the reliability tests: senders, finders, process facts."""
from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Callable

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind, Verification

from pacs.config import load
from pacs.index.models import Instance
from tests.conftest import ServeProcess, dataset_bytes, open_index
from tests.dicomgen import make_instance, uid
from tests.reliability.raw import send_store
from tests.test_workers import children

SETSID = Path("/usr/bin/setsid")
FIND_CHUNK = 200  # SOP Instance UIDs per C-FIND identifier


def start_serve(config_path: Path, own_group: bool = False) -> ServeProcess:
    """`pacs serve` on an existing config (a restart keeps its store and index).

    `own_group`: in a new process group (setsid), so a test can SIGKILL the
    supervisor and its workers at once, as a power cut or the OOM killer would.
    """
    return ServeProcess(config_path, prefix=(str(SETSID),) if own_group else ())


def expected_bytes(ds: Dataset) -> bytes:
    """The data set as pynetdicom puts it on the wire in Explicit VR Little Endian."""
    return encode(ds, False, True)


class StoreLoop(threading.Thread):
    """One modality: sends instances on one association after another until stopped.

    Records every instance answered 0x0000 with the bytes it sent; an aborted
    association (the node died) is replaced by a new one while the node answers.
    """

    def __init__(self, port: int, name: str, rng: random.Random):
        super().__init__(name=name, daemon=True)
        self.port = port
        self.rng = rng
        self.acked: dict[str, bytes] = {}
        self.refused: list[int] = []
        self.stop = threading.Event()

    def instance(self, number: int) -> Dataset:
        study = uid(self.name, "study", number // 50)
        size = self.rng.choice((8, 8, 64, 256))  # some are large enough to be cut mid-transfer
        return make_instance(patient_id=self.name, study=study, series=uid(study, "s"),
                             sop=uid(self.name, "sop", number), number=number, rows=size, cols=size)

    def run(self) -> None:
        ae = AE(ae_title="CRASHSCU")
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        # A response lost when the node is killed (pynetdicom does not always notice the
        # abort while it waits) holds the sender this long; the node answers in well under 1 s.
        ae.dimse_timeout = ae.acse_timeout = 10
        number = 0
        while not self.stop.is_set():
            assoc = ae.associate("127.0.0.1", self.port, ae_title="MINIPACS")
            if not assoc.is_established:
                self.stop.wait(0.05)
                continue
            while not self.stop.is_set() and assoc.is_established:
                number += 1
                ds = self.instance(number)
                try:
                    status = assoc.send_c_store(ds)
                except RuntimeError:  # aborted between the check and the send
                    break
                if "Status" not in status:  # aborted or timed out: no answer
                    break
                if status.Status == 0:
                    self.acked[str(ds.SOPInstanceUID)] = expected_bytes(ds)
                else:
                    self.refused.append(status.Status)
            if assoc.is_established:
                assoc.release()


def store_one(proc, ds: Dataset) -> Dataset:
    """C-STORE one instance on its own raw association (no pynetdicom requestor); the response."""
    answer = send_store(proc.port, str(ds.SOPClassUID), str(ds.SOPInstanceUID), expected_bytes(ds))
    assert isinstance(answer, Dataset), f"no C-STORE response: {answer}"
    return answer


def find_uids(port: int, uids: list[str]) -> set[str]:
    """The SOP Instance UIDs among `uids` a Study Root IMAGE-level C-FIND returns.

    pynetdicom's requestor now and then loses a response (README: the
    reliability suite), so UIDs not found are asked for again, twice: an
    instance that is not there is never found.
    """
    found: set[str] = set()
    for _ in range(3):
        missing = [u for u in uids if u not in found]
        if not missing:
            break
        found |= _find_once(port, missing)
    return found


def _find_once(port: int, uids: list[str]) -> set[str]:
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.dimse_timeout = 10
    found = set()
    for start in range(0, len(uids), FIND_CHUNK):
        assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.SOPInstanceUID = uids[start:start + FIND_CHUNK]
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = status.get("Status")
            if code is None:  # the final response was lost: the association is aborted
                break
            assert code in (0xFF00, 0x0000), f"C-FIND status 0x{code:04X}"
            if code == 0xFF00:
                found.add(str(identifier.SOPInstanceUID))
        if assoc.is_established:
            assoc.release()
    return found


def stored_bytes(config_path: Path, uids: list[str]) -> dict[str, bytes]:
    """Each indexed instance's data set bytes, read from the file its index row names."""
    store = load(config_path).storage.root
    with open_index(config_path):
        rows = {}
        for start in range(0, len(uids), 500):
            chunk = uids[start:start + 500]
            rows.update(Instance.select(Instance.sop_uid, Instance.path)
                        .where(Instance.sop_uid.in_(chunk)).tuples())
    return {sop: dataset_bytes(store / relpath) for sop, relpath in rows.items()}


def index_rows(database: str, sop_uid: str | None = None) -> int | None:
    """Instance rows (of one SOP Instance UID) in a SQLite index, read beside the process
    writing it without taking any lock a writer waits for; None while there is no table."""
    where, params = ("WHERE sop_uid = ?", (sop_uid,)) if sop_uid else ("", ())
    try:
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)) as db:
            return db.execute(f"SELECT count(*) FROM instance {where}", params).fetchone()[0]
    except sqlite3.OperationalError:  # not created yet, or dropped by reindex just now
        return None


def verifying(config_path: Path) -> Callable[[], list[str]]:
    """Start `pacs verify`; the returned function waits for its problem lines.

    It only reads, so it can run beside a node's start and the C-FIND checks.
    """
    proc = subprocess.Popen([sys.executable, "-m", "pacs", "verify", "--no-progress",
                             "--config", str(config_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def problems() -> list[str]:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, 1), err
        return out.splitlines()[:-1]  # the last line is the summary

    return problems


def verify_problems(config_path: Path) -> list[str]:
    """`pacs verify`'s problem lines."""
    return verifying(config_path)()


def echo_ok(port: int, slot_wait: float = 10) -> bool:
    """A C-ECHO answers Success. A rejection is tried again for up to `slot_wait`
    seconds: associations a barrage just ended hold their slots until the node's
    threads for them have finished (up to a second each, `activity._finish`)."""
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + slot_wait
    assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
    while assoc.is_rejected and time.monotonic() < deadline:
        time.sleep(0.1)
        assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return status.get("Status") == 0


def proc_status(pid: int, field: str) -> int:
    """A numeric field of /proc/<pid>/status (VmHWM, VmRSS in kB; Threads)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def serving_pids(proc, workers: int) -> list[int]:
    """The processes that run associations: `pacs serve` itself, or its workers."""
    return sorted(children(proc.proc.pid)) if workers > 1 else [proc.proc.pid]


def settled_threads(pids: list[int], timeout: float = 10) -> dict[int, int]:
    """Each process's thread count once it stopped changing for a second.

    A worker that was just handed its first connection may still be starting
    its long-lived threads (sweeper, audit flusher, server): counted too early,
    they would read as threads an association left behind.
    """
    deadline = time.monotonic() + timeout
    counts = {pid: proc_status(pid, "Threads") for pid in pids}
    while time.monotonic() < deadline:
        time.sleep(1)
        again = {pid: proc_status(pid, "Threads") for pid in pids}
        if again == counts:
            break
        counts = again
    return counts


def wait_for(condition, timeout: float) -> None:
    """Poll until `condition()` holds; fail after `timeout` seconds (a hang, not a speed limit)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)
