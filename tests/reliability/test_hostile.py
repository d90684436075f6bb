"""Hostile input: random and mutated PDUs, mutated data sets in C-STORE, SQL in C-FIND keys.

Every case is drawn from the test's seeded `rng`; a failure names the case
number, and `PACS_SEED` replays the same cases.
"""
from __future__ import annotations

import os
import random
import socket
import struct

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as StudyRootFind

from tests.conftest import stored_path
from tests.dicomgen import CT, make_instance, uid
from tests.reliability.conftest import scale
from tests.reliability.raw import (
    ABORT, RELEASE_RQ, answers_until_close, associate_rq, connect, echo_pdata, send_store,
)
from tests.reliability.support import (
    echo_ok, proc_status, serving_pids, store_one, verify_problems, wait_for,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on invalid UIDs
UNKNOWN_TYPES = (0x00, 0x08, 0x09, 0x10, 0x41, 0x7F, 0x80, 0xFF)
PDU_NAMES = {0x02: "AC", 0x03: "RJ", 0x04: "P-DATA", 0x06: "RP", 0x07: "ABORT"}
ODD_LENGTHS = (0, 1, 3, 5, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF)


def mutate(pdu: bytes, rng: random.Random) -> bytes:
    """One PDU broken in one of the ways a faulty or hostile peer breaks them."""
    data = bytearray(pdu)
    how = rng.choice(("truncate", "length", "type", "flip", "field", "append"))
    if how == "truncate":
        return bytes(data[:rng.randrange(len(data))])
    if how == "length":  # the PDU length field lies
        length = rng.choice((*ODD_LENGTHS, len(data) - 7, len(data) - 5, rng.randrange(1 << 32)))
        data[2:6] = struct.pack(">I", max(0, length))
    elif how == "type":
        data[0] = rng.choice(UNKNOWN_TYPES)
    elif how == "flip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif how == "field" and len(data) > 8:  # an item or PDV length inside the PDU lies
        at = rng.randrange(6, len(data) - 1)
        data[at:at + 2] = struct.pack(">H", rng.choice((0, 1, 0xFFFF, rng.randrange(1 << 16))))
    else:
        data += rng.randbytes(rng.randint(1, 64))
    return bytes(data)


def pdu_case(rng: random.Random) -> tuple[str, list[bytes]]:
    """(kind, the byte strings to send in order on one connection)."""
    kind = rng.choice(("associate", "after-associate", "echo", "garbage", "unexpected"))
    rq = associate_rq()
    if kind == "associate":
        return kind, [mutate(rq, rng)]
    if kind == "after-associate":
        return kind, [rq, mutate(rng.choice((echo_pdata(), RELEASE_RQ, ABORT, rq)), rng)]
    if kind == "echo":
        return kind, [rq, echo_pdata(), mutate(echo_pdata(rng.choice((1, 3, 5, 255))), rng)]
    if kind == "garbage":
        return kind, [rng.randbytes(rng.randint(0, 300))]
    unexpected = rng.choice((b"\x02", b"\x03", b"\x06")) + b"\x00" + struct.pack(">I", 4) + bytes(4)
    return kind, [rng.choice((rq, b"")), unexpected]


def run_pdu_case(port: int, chunks: list[bytes]) -> list[int]:
    """Send the chunks, say we are done sending, read until the node closes."""
    with connect(port, timeout=60) as sock:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the node closed first: that is an answer too
            pass
        return answers_until_close(sock)


@pytest.mark.parametrize("workers", [1, 2])
def test_random_and_mutated_pdus(serve_process, rng, workers):
    """The node answers or aborts every broken association, keeps serving, and leaks nothing.

    With `network.workers: 2` the connections go through the supervisor's hand-off;
    no worker may die (and be replaced) on the way.
    """
    cases = scale(500, 5000)  # per worker setting
    proc = serve_process(network={"max_associations": 64, "workers": workers})
    serving = serving_pids(proc, workers)
    threads_before = {pid: proc_status(pid, "Threads") for pid in serving}
    drawn = [pdu_case(rng) for _ in range(cases)]
    outcomes: Counter = Counter()

    def run(index: int) -> tuple[str, tuple[int, ...]]:
        kind, chunks = drawn[index]
        try:
            return kind, tuple(run_pdu_case(proc.port, chunks))
        except TimeoutError:
            raise AssertionError(f"case {index} ({kind}): the node neither answered nor closed "
                                 f"in 60 s: {[c[:32].hex() for c in chunks]}") from None

    with ThreadPoolExecutor(8) as pool:
        for kind, answers in pool.map(run, range(cases)):
            outcomes[(kind, "+".join(sorted({PDU_NAMES.get(a, hex(a)) for a in answers})) or "closed")] += 1
    print(f"{cases} PDU cases, (kind, PDU types answered): {sorted(outcomes.items())}")
    assert proc.proc.poll() is None and serving_pids(proc, workers) == serving
    assert echo_ok(proc.port)
    # Every association thread ended; no forged length cost its claimed size in memory.
    wait_for(lambda: all(proc_status(pid, "Threads") <= threads_before[pid] + 2
                         for pid in serving), timeout=30)
    assert max(proc_status(pid, "VmHWM") for pid in serving) < 1 << 20  # kB: 1 GiB
    # pynetdicom 3.0 logs tracebacks of its own for undecodable PDUs, and its DUL thread dies
    # on a state-machine race (Evt7 in Sta13) that ends that connection; none may pass our code.
    assert f"{os.sep}pacs{os.sep}" not in proc.log_text().replace(f"{os.sep}pacs{os.sep}pacs.yaml", "")


HOSTILE_UIDS = ("../../../../tmp/pacs-escape", "1.2/3", "..", "/", "1.2.3\0", "\0",
                "1.2.3\0/../../x", "1." + "2" * 70, "1.2.abc", "", " ", "1.2.3\\1.2.4",
                "1.2.3" + "\n" + "4")


def elements(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, length field offset, length field width) of each top-level Explicit VR LE element."""
    found, offset = [], 0
    while offset + 8 <= len(data):
        vr = data[offset + 4:offset + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OD", b"OL", b"OV"):
            found.append((offset, offset + 8, 4))
            length = struct.unpack("<I", data[offset + 8:offset + 12])[0]
            offset += 12 + length
        else:
            found.append((offset, offset + 6, 2))
            offset += 8 + struct.unpack("<H", data[offset + 6:offset + 8])[0]
    return found


def dataset_case(rng: random.Random, n: int) -> tuple[str, str, str, bytes]:
    """(what, Affected SOP Class UID, Affected SOP Instance UID, data set bytes)."""
    from pynetdicom.dsutils import encode

    what = rng.choice(("uid", "uid", "length", "huge", "unclosed", "truncate", "flip"))
    sop = uid("hostile", n)
    if what == "uid":
        bad = rng.choice(HOSTILE_UIDS)
        keyword = rng.choice(("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                              "SOPClassUID", "affected"))
        ds = make_instance(patient_id=f"H{n}", sop=sop)
        if keyword == "affected":
            return f"affected={bad!r}", CT, bad, encode(ds, False, True)
        setattr(ds, keyword, bad)
        affected = bad if keyword == "SOPInstanceUID" and rng.random() < 0.7 else sop
        return f"{keyword}={bad!r}", CT, affected, encode(ds, False, True)
    data = bytearray(encode(make_instance(patient_id=f"H{n}", sop=sop, rows=16, cols=16),
                            False, True))
    offset, at, width = rng.choice(elements(bytes(data)))
    if what in ("length", "huge"):
        value = rng.randrange(1 << (8 * width)) if what == "length" else (1 << (8 * width)) - rng.choice((1, 2, 16))
        data[at:at + width] = value.to_bytes(width, "little")
    elif what == "unclosed":  # an undefined-length sequence and item, never delimited
        data[offset:offset] = (b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff"
                               b"\xfe\xff\x00\xe0\xff\xff\xff\xff")
    elif what == "truncate":
        del data[rng.randrange(len(data)):]
    else:
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    return f"{what} at byte {offset}", CT, sop, bytes(data)


def test_mutated_datasets_are_refused_or_stored_safely(serve_process, rng):
    cases = scale(300, 3000)
    proc = serve_process()
    folder = proc.config_path.parent
    before = {p for p in folder.rglob("*")}
    outcomes: Counter = Counter()
    for n in range(cases):
        what, sop_class, affected, data = dataset_case(rng, n)
        answer = send_store(proc.port, sop_class, affected, data)
        if isinstance(answer, int) or answer == "closed":
            # pynetdicom itself aborts on a command set it cannot turn into a C-STORE
            # request (a malformed Affected SOP Instance UID), before our handler runs.
            assert affected in HOSTILE_UIDS, f"case {n} ({what}): {answer}"
            outcomes[(what.split("=")[0], "abort" if answer == 0x07 else str(answer))] += 1
            continue
        status = answer.Status
        assert status not in (0xFF00, 0xFE00), f"case {n} ({what}): 0x{status:04X}"
        if status == 0:
            # A UID's trailing NUL or space is padding (PS3.5 9.1): stored without it.
            assert stored_path(proc.config, affected.rstrip("\0 ")).is_file(), f"case {n} ({what})"
        else:
            assert answer.get("ErrorComment"), f"case {n} ({what}): 0x{status:04X} without comment"
        outcomes[(what.split("=")[0].split(" at ")[0], f"0x{status:04X}")] += 1
    print(f"{cases} data set cases, (mutation, status): {sorted(outcomes.items())}")
    assert proc.proc.poll() is None and echo_ok(proc.port)
    store_root = proc.config.storage.root
    outside = {p for p in folder.rglob("*") if store_root not in p.parents and p != store_root}
    assert outside - before <= {folder / "data" / name for name in (
        "index.sqlite", "index.sqlite-wal", "index.sqlite-shm", "index.sqlite-writer")}
    assert verify_problems(proc.config_path) == []


SQL_STUDY = {"PatientName": "O'BRIEN^ANN", "PatientID": "ID'1;", "AccessionNumber": "100%",
             "StudyDescription": "A_B; DROP TABLE study; --", "StudyID": "S_1'",
             "ReferringPhysicianName": "D'OC^%", "InstitutionName": "X'Y%Z_"}
DECOY = {"PatientName": "OXBRIEN^ANN", "PatientID": "ID11", "AccessionNumber": "1000",
         "StudyDescription": "AXB", "StudyID": "SX1", "ReferringPhysicianName": "DXOC^X",
         "InstitutionName": "XXYXZX"}
SQL_QUERIES = [  # (key, value, which studies match: "sql", "decoy")
    ("PatientName", "O'BRIEN^ANN", {"sql"}), ("PatientName", "O_BRIEN^ANN", set()),
    ("PatientName", "O%", set()), ("PatientName", "O'BRIEN*", {"sql"}),
    ("PatientID", "ID'1;", {"sql"}), ("PatientID", "ID_1;", set()), ("PatientID", "ID%", set()),
    ("AccessionNumber", "100%", {"sql"}), ("AccessionNumber", "100_", set()),
    ("AccessionNumber", "100%\\1000", {"sql", "decoy"}),
    ("StudyDescription", "A_B; DROP TABLE study; --", {"sql"}), ("StudyDescription", "A%B", set()),
    ("StudyDescription", "A_B*", {"sql"}), ("StudyID", "S_1'", {"sql"}), ("StudyID", "S%", set()),
    ("ReferringPhysicianName", "D'OC^%", {"sql"}), ("ReferringPhysicianName", "D_OC^_", set()),
    ("InstitutionName", "X'Y%Z_", {"sql"}), ("InstitutionName", "X_Y_Z%", set()),
    ("ModalitiesInStudy", "C%", set()), ("ModalitiesInStudy", "CT'; --", set()),
    ("StudyDate", "2024'0102", set()), ("StudyTime", "10%", set()),
    ("StudyInstanceUID", "1.2'; DROP TABLE study; --", set()),
]


def test_find_keys_with_sql_metacharacters_are_literals(serve_process):
    """', ;, %, _ and \\ in keys of every kind match only themselves (\\ separates values)."""
    proc = serve_process()
    studies = {"sql": make_instance(patient_id=SQL_STUDY["PatientID"], **{
                   k: v for k, v in SQL_STUDY.items() if k != "PatientID"}),
               "decoy": make_instance(patient_id=DECOY["PatientID"], **{
                   k: v for k, v in DECOY.items() if k != "PatientID"})}
    for ds in studies.values():
        assert store_one(proc, ds).Status == 0
    by_uid = {str(ds.StudyInstanceUID): name for name, ds in studies.items()}
    for key, value, expected in SQL_QUERIES:
        statuses, found = study_find(proc.port, key, value)
        assert statuses[-1] in (0x0000, 0xA900), f"{key}={value!r}: 0x{statuses[-1]:04X}"
        assert {by_uid[uid] for uid in found} == expected, f"{key}={value!r}"
    statuses, found = study_find(proc.port, "PatientID", "")
    assert statuses[-1] == 0 and {by_uid[uid] for uid in found} == {"sql", "decoy"}


def study_find(port: int, key: str, value: str) -> tuple[list[int], set[str]]:
    """(every status, the StudyInstanceUIDs found) of one STUDY-level Study Root C-FIND."""
    ae = AE(ae_title="SQLFIND")
    ae.add_requested_context(StudyRootFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    setattr(query, key, value)
    statuses, found = [], set()
    for status, identifier in assoc.send_c_find(query, StudyRootFind):
        statuses.append(status.get("Status"))
        if status.get("Status") == 0xFF00:
            found.add(str(identifier.StudyInstanceUID))
    assoc.release()
    assert statuses, "no C-FIND response"
    return statuses, found
