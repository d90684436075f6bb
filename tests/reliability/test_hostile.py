"""Hostile input: random and mutated PDUs, mutated data sets in C-STORE, SQL in C-FIND keys.

Random cases are drawn from the test's seeded `rng` (the hostile UIDs also run
as fixed cases, each in every UID field); a failure names the case number, and
`PACS_SEED` replays the same cases.
"""
from __future__ import annotations

import itertools
import os
import random
import socket
import struct

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as StudyRootFind

from tests.conftest import stored_file
from tests.dicomgen import CT, make_instance, uid
from tests.find_support import query
from tests.reliability.conftest import scale
from tests.reliability.raw import (
    ABORT, RELEASE_RQ, answers_until_close, associate_rq, connect, echo_pdata, send_store,
)
from tests.reliability.support import (
    echo_ok, proc_status, serving_pids, settled_threads, store_one, verify_problems, wait_for,
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
    threads_before = settled_threads(serving)
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


# Where a hostile UID goes: a data set element, the request's Affected SOP Instance UID, or both.
UID_FIELDS = ("SOPInstanceUID", "SOPInstanceUID+affected", "StudyInstanceUID",
              "SeriesInstanceUID", "SOPClassUID", "affected")


def uid_case(bad: str, field: str, n: int) -> tuple[str, str, str, bytes]:
    """A sound instance with one hostile UID in `field` (see UID_FIELDS); as dataset_case."""
    sop = uid("hostile", n)
    ds = make_instance(patient_id=f"H{n}", sop=sop)
    keyword = field.removesuffix("+affected")
    if keyword != "affected":
        setattr(ds, keyword, bad)
    affected = bad if field.endswith("affected") else sop
    return f"{field}={bad!r}", CT, affected, encode(ds, False, True)


def escape_targets(bases: set[Path]) -> set[Path]:
    """The paths a hostile UID would name, as itself or with .dcm, joined to any of `bases`
    (cut at a NUL, as the C library would)."""
    targets = {Path("/tmp/pacs-escape")}
    for base in bases:
        for bad in HOSTILE_UIDS:
            for name in (bad, bad + ".dcm"):
                name = name.split("\0")[0]
                if name.strip():
                    targets.add(Path(os.path.normpath(base / name)))
    return targets


def dataset_case(rng: random.Random, n: int) -> tuple[str, str, str, bytes]:
    """(what, Affected SOP Class UID, Affected SOP Instance UID, data set bytes)."""
    what = rng.choice(("uid", "uid", "length", "huge", "unclosed", "truncate", "flip"))
    if what == "uid":
        return uid_case(rng.choice(HOSTILE_UIDS), rng.choice(UID_FIELDS), n)
    sop = uid("hostile", n)
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
    """Every hostile UID in every UID field (fixed cases), then random mutations."""
    proc = serve_process()
    folder = proc.config_path.parent
    store_root = proc.config.storage.root
    fixed = [uid_case(bad, field, n) for n, (bad, field) in
             enumerate(itertools.product(HOSTILE_UIDS, UID_FIELDS))]
    cases = fixed + [dataset_case(rng, n) for n in range(len(fixed), scale(300, 3000))]
    bases = {Path("/"), Path.cwd(), folder, store_root, store_root / ".staging"}
    before = {p for p in folder.rglob("*")}
    existed = {p for p in escape_targets(bases) if p.exists()}
    outcomes: Counter = Counter()
    for n, (what, sop_class, affected, data) in enumerate(cases):
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
            assert stored_file(proc.config, affected.rstrip("\0 ")).is_file(), f"case {n} ({what})"
        else:
            assert answer.get("ErrorComment"), f"case {n} ({what}): 0x{status:04X} without comment"
        outcomes[(what.split("=")[0].split(" at ")[0], f"0x{status:04X}")] += 1
    print(f"{len(cases)} data set cases ({len(fixed)} fixed), (mutation, status): "
          f"{sorted(outcomes.items())}")
    assert proc.proc.poll() is None and echo_ok(proc.port)
    # No hostile UID became a path: from the store, its staging and shard folders, the
    # node's folder and working directory, the root (the layout's own folders aside).
    layout = {store_root, *store_root.glob("*"), *store_root.glob("*/*")}
    shards = {p for p in layout if p.is_dir()}
    escaped = {p for p in escape_targets(bases | shards) if p.exists()} - existed - layout
    assert not escaped, escaped
    outside = {p for p in folder.rglob("*") if store_root not in p.parents and p != store_root}
    assert outside - before <= {folder / "data" / name for name in (
        "index.sqlite", "index.sqlite-wal", "index.sqlite-shm", "index.sqlite-writer")}
    assert verify_problems(proc.config_path) == []


SQL_STUDY = {"PatientName": "O'BRIEN^ANN", "PatientID": "ID'1;", "AccessionNumber": "100%",
             "StudyDescription": "A_B; DROP TABLE study; --", "StudyID": "S_1'",
             "ReferringPhysicianName": "D'OC^%", "InstitutionName": "X'Y%Z_",
             "PatientBirthDate": "19800229", "SeriesDescription": "S'1_%", "SeriesNumber": 12,
             "InstanceNumber": 7}
DECOY = {"PatientName": "OXBRIEN^ANN", "PatientID": "ID11", "AccessionNumber": "1000",
         "StudyDescription": "AXB", "StudyID": "SX1", "ReferringPhysicianName": "DXOC^X",
         "InstitutionName": "XXYXZX", "SeriesDescription": "SX1XX", "SeriesNumber": 1,
         "InstanceNumber": 71}
BOTH = {"sql", "decoy"}
SQL_QUERIES = [  # (level, key, value, which studies match: "sql", "decoy"); `?` is DICOM's wild card
    ("STUDY", "PatientName", "O'BRIEN^ANN", {"sql"}), ("STUDY", "PatientName", "O_BRIEN^ANN", set()),
    ("STUDY", "PatientName", "O%", set()), ("STUDY", "PatientName", "O'BRIEN*", {"sql"}),
    ("STUDY", "PatientName", "O?BRIEN^ANN", BOTH),
    ("STUDY", "PatientID", "ID'1;", {"sql"}), ("STUDY", "PatientID", "ID_1;", set()),
    ("STUDY", "PatientID", "ID%", set()), ("STUDY", "PatientID", "ID?1;", {"sql"}),
    ("STUDY", "AccessionNumber", "100%", {"sql"}), ("STUDY", "AccessionNumber", "100_", set()),
    ("STUDY", "AccessionNumber", "100%\\1000", BOTH), ("STUDY", "AccessionNumber", "100?", BOTH),
    ("STUDY", "StudyDescription", "A_B; DROP TABLE study; --", {"sql"}),
    ("STUDY", "StudyDescription", "A%B", set()), ("STUDY", "StudyDescription", "A_B*", {"sql"}),
    ("STUDY", "StudyDescription", "A?B*", BOTH),
    ("STUDY", "StudyID", "S_1'", {"sql"}), ("STUDY", "StudyID", "S%", set()),
    ("STUDY", "ReferringPhysicianName", "D'OC^%", {"sql"}),
    ("STUDY", "ReferringPhysicianName", "D_OC^_", set()),
    ("STUDY", "InstitutionName", "X'Y%Z_", {"sql"}), ("STUDY", "InstitutionName", "X_Y_Z%", set()),
    ("STUDY", "ModalitiesInStudy", "C%", set()), ("STUDY", "ModalitiesInStudy", "CT'; --", set()),
    ("STUDY", "StudyDate", "2024'0102", set()), ("STUDY", "StudyTime", "10%", set()),
    ("STUDY", "StudyInstanceUID", "1.2'; DROP TABLE study; --", set()),
    ("STUDY", "PatientBirthDate", "19800229", {"sql"}), ("STUDY", "PatientBirthDate", "1980%", set()),
    ("STUDY", "PatientBirthDate", "1980022_", set()), ("STUDY", "PatientBirthDate", "1980022?", set()),
    ("STUDY", "PatientBirthDate", "1980'0229", set()),
    ("SERIES", "SeriesDescription", "S'1_%", {"sql"}), ("SERIES", "SeriesDescription", "S_1__", set()),
    ("SERIES", "SeriesDescription", "S%", set()), ("SERIES", "SeriesDescription", "S?1??", BOTH),
    ("SERIES", "SeriesDescription", "S'1?%", {"sql"}), ("SERIES", "Modality", "C_", set()),
    ("SERIES", "Modality", "C?", BOTH), ("SERIES", "BodyPartExamined", "%", set()),
    ("SERIES", "SeriesNumber", "12", {"sql"}), ("SERIES", "SeriesNumber", "1%", set()),
    ("SERIES", "SeriesNumber", "1_", set()), ("SERIES", "SeriesNumber", "1?", set()),
    ("SERIES", "SeriesNumber", "1'; --", set()), ("SERIES", "SeriesInstanceUID", "1.2%", set()),
    ("IMAGE", "InstanceNumber", "7", {"sql"}), ("IMAGE", "InstanceNumber", "7%", set()),
    ("IMAGE", "InstanceNumber", "7_", set()), ("IMAGE", "InstanceNumber", "7?", set()),
    ("IMAGE", "InstanceNumber", "7'; --", set()), ("IMAGE", "SOPInstanceUID", "%", set()),
    ("IMAGE", "SOPInstanceUID", "1.2'; DROP TABLE instance; --", set()),
]


def test_find_keys_with_sql_metacharacters_are_literals(serve_process):
    """', ;, %, _ and \\ in keys of every kind (text, IS, DA, UI; STUDY, SERIES and IMAGE
    level) match only themselves (\\ separates values); `?` stays DICOM's one-character wild card."""
    proc = serve_process()
    studies = {"sql": make_instance(patient_id=SQL_STUDY["PatientID"], **{
                   k: v for k, v in SQL_STUDY.items() if k != "PatientID"}),
               "decoy": make_instance(patient_id=DECOY["PatientID"], **{
                   k: v for k, v in DECOY.items() if k != "PatientID"})}
    for ds in studies.values():
        assert store_one(proc, ds).Status == 0
    by_uid = {str(ds.StudyInstanceUID): name for name, ds in studies.items()}
    for level, key, value, expected in SQL_QUERIES:
        statuses, found = level_find(proc.port, level, key, value)
        assert statuses[-1] in (0x0000, 0xA900), f"{key}={value!r}: 0x{statuses[-1]:04X}"
        assert {by_uid[uid] for uid in found} == expected, f"{level} {key}={value!r}"
    statuses, found = level_find(proc.port, "STUDY", "PatientID", "")
    assert statuses[-1] == 0 and {by_uid[uid] for uid in found} == BOTH


def level_find(port: int, level: str, key: str, value: str) -> tuple[list[int], set[str]]:
    """(every status, the StudyInstanceUIDs of the matches) of one Study Root C-FIND."""
    ae = AE(ae_title="SQLFIND")
    ae.add_requested_context(StudyRootFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
    assert assoc.is_established
    raw = value.encode() + b" " * (len(value) % 2)  # as given: pydicom refuses an IS "1%"
    identifier = query(level, **{"StudyInstanceUID": "", key: raw})
    statuses, found = [], set()
    for status, identifier in assoc.send_c_find(identifier, StudyRootFind):
        statuses.append(status.get("Status"))
        if status.get("Status") == 0xFF00:
            found.add(str(identifier.StudyInstanceUID))
    assoc.release()
    assert statuses, "no C-FIND response"
    return statuses, found
