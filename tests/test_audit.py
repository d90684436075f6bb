"""Logs and audit trail through the real protocol: `pacs serve` subprocesses, pynetdicom clients."""
from __future__ import annotations

import json
import logging
import re
import signal
import time

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind as StudyRootFind,
    StudyRootQueryRetrieveInformationModelGet as StudyRootGet,
    StudyRootQueryRetrieveInformationModelMove as StudyRootMove,
    Verification,
)

from pacs.logs import SharedRotatingFileHandler
from tests.conftest import associate, run_pacs, send_datasets
from tests.dicomgen import make_study
from tests.retrieve_support import RecordingSCP, counts, identifier, retrieve

pytestmark = pytest.mark.both_backends  # the audit trail lives in either index

NAME = "SECRETNAME^JANE"
PID = "PID-AUDIT-7"


def find(proc, ae_title: str = "FINDSCU") -> list[Dataset]:
    """A Study Root C-FIND by patient name; the statuses of every response."""
    ae = AE(ae_title)
    ae.add_requested_context(StudyRootFind)
    assoc = ae.associate("127.0.0.1", proc.port, ae_title=proc.ae_title)
    assert assoc.is_established
    query = identifier("STUDY", PatientName="SECRETNAME*", StudyInstanceUID="", StudyDate="")
    try:
        return [status for status, _ in assoc.send_c_find(query, StudyRootFind)]
    finally:
        assoc.release()


def get(proc, study_uid: str) -> tuple:
    received = []
    role = build_role(CTImageStorage, scp_role=True)

    def on_store(event) -> int:
        received.append(event.request.AffectedSOPInstanceUID)
        return 0

    _, final, _ = retrieve(proc, identifier("STUDY", StudyInstanceUID=study_uid), StudyRootGet,
                           contexts=[(CTImageStorage, [ExplicitVRLittleEndian])], ext_neg=[role],
                           evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return final, received


def rejected_association(proc) -> None:
    ae = AE("BADCALLER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", proc.port, ae_title="NOTTHEPACS")
    assert assoc.is_rejected


def test_store_find_move_get_log_lines_and_audit(serve_process):
    dest = RecordingSCP("DEST")
    try:
        proc = serve_process(remote_aes={"DEST": {"host": "127.0.0.1", "port": dest.port}})
        study = make_study(patient_id=PID, series=1, per_series=3)
        for ds in study:
            ds.PatientName = NAME
        study_uid = str(study[0].StudyInstanceUID)
        assert [s.Status for s in send_datasets(proc, study, ae_title="MODALITY")] == [0] * 3
        statuses = find(proc)
        assert [s.Status for s in statuses] == [0xFF00, 0]
        _, moved, _ = retrieve(proc, identifier("STUDY", StudyInstanceUID=study_uid),
                               StudyRootMove, destination="DEST")
        assert moved.Status == 0 and counts(moved) == (3, 0, 0)
        got, received = get(proc, study_uid)
        assert got.Status == 0 and len(received) == 3
        rejected_association(proc)
        aborted = associate(proc, ae_title="ABORTER")
        assert aborted.send_c_echo().Status == 0
        aborted.abort()
        assert proc.terminate() == 0
    finally:
        dest.stop()
    text = proc.log_text()

    # One line per association, at INFO, with caller, peer, called AE, duration, outcome.
    assoc_lines = re.findall(r"INFO \[\d+\] pacs\.association: association #\d+ (.*)", text)
    store_line = next(line for line in assoc_lines if line.startswith("MODALITY@"))
    assert re.fullmatch(r"MODALITY@127\.0\.0\.1:\d+ -> MINIPACS: released after \d+\.\d{3} s; "
                        r"C-STORE 3 \(stored 3 in 1 study, 0 failed\)", store_line), store_line
    assert any(re.fullmatch(r"BADCALLER@127\.0\.0\.1:\d+ -> NOTTHEPACS: rejected \(Called AE "
                            r"title not recognised\) after \d+\.\d{3} s; no operations", line)
               for line in assoc_lines), assoc_lines
    assert sum(line.startswith("RETRIEVER@") for line in assoc_lines) == 2
    # "(connection closed)" only when the DUL thread wins a narrow race (activity._finish)
    assert any(re.fullmatch(r"ABORTER@127\.0\.0\.1:\d+ -> MINIPACS: aborted "
                            r"(\(connection closed\) )?"
                            r"after \d+\.\d{3} s; C-ECHO 1", line)
               for line in assoc_lines), assoc_lines
    # One line per C-FIND, C-MOVE, C-GET with model, level, keys, counts and final status.
    op_lines = re.findall(r"INFO \[\d+\] pacs\.operation: #\d+ (.*)", text)
    assert ("C-FIND from FINDSCU: Study Root STUDY PatientName=*** (+2 return keys): "
            "1 matches, status 0x0000") in op_lines, op_lines
    assert (f"C-MOVE from RETRIEVER to DEST: Study Root STUDY StudyInstanceUID={study_uid}: "
            "3 completed, 0 failed, 0 warning, status 0x0000") in op_lines, op_lines
    assert (f"C-GET from RETRIEVER: Study Root STUDY StudyInstanceUID={study_uid}: "
            "3 completed, 0 failed, 0 warning, status 0x0000") in op_lines, op_lines
    # At INFO: no patient name, no single-store lines.
    assert "SECRETNAME" not in text
    assert "C-STORE from" not in text
    assert "Traceback" not in text

    result = run_pacs("audit", "--since", "1h", "--json", config=proc.config_path)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    by_type = {event["event"]: event for event in events}
    assert sorted(by_type) == ["find", "get", "move", "reject", "store"] and len(events) == 5
    assert (by_type["reject"]["calling_ae"], by_type["reject"]["status"],
            by_type["reject"]["detail"]) == (
        "BADCALLER", 7, "A-ASSOCIATE-RJ Rejected Permanent, Service User: "
                        "Called AE title not recognised; called NOTTHEPACS")
    assert by_type["store"] | {"time": None, "peer": None} == {
        "time": None, "event": "store", "calling_ae": "MODALITY", "peer": None, "status": 0,
        "count": 3, "failed": 0, "destination": "", "patient_id": PID, "studies": [study_uid],
        "detail": ""}
    assert re.fullmatch(r"127\.0\.0\.1:\d+", by_type["store"]["peer"])
    assert by_type["find"]["calling_ae"] == "FINDSCU" and by_type["find"]["count"] == 1
    assert by_type["find"]["detail"] == "Study Root STUDY PatientName=*** (+2 return keys)"
    move = by_type["move"]
    assert (move["destination"], move["studies"], move["patient_id"], move["count"]) == (
        "DEST", [study_uid], PID, 3)
    assert (by_type["get"]["calling_ae"], by_type["get"]["studies"],
            by_type["get"]["count"], by_type["get"]["status"]) == ("RETRIEVER", [study_uid], 3, 0)
    assert all("SECRETNAME" not in json.dumps(event) for event in events)

    plain = run_pacs("audit", "--since", "2000-01-01", "--type", "move", config=proc.config_path)
    assert plain.returncode == 0
    lines = plain.stdout.splitlines()
    assert len(lines) == 1 and re.match(
        rf"\S+Z move RETRIEVER@127\.0\.0\.1:\d+ status=0x0000 count=3 to=DEST patient={PID} "
        rf"studies={re.escape(study_uid)} \[", lines[0]), lines
    assert run_pacs("audit", "--since", "1h", "--ae", "NOBODY",
                    config=proc.config_path).stdout == ""
    assert run_pacs("audit", "--since", "1h", "--until", "2h",
                    config=proc.config_path).stdout == ""
    # The audit trail survives a rebuild of the index.
    assert run_pacs("reindex", "--no-progress", config=proc.config_path).returncode == 0
    again = run_pacs("audit", "--since", "1h", config=proc.config_path)
    assert len(again.stdout.splitlines()) == 5


def store_rows(proc, wanted, timeout: float = 30) -> list[dict]:
    """The store events of `pacs audit --json` once `wanted(rows)` holds (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        result = run_pacs("audit", "--since", "1h", "--type", "store", "--json",
                          config=proc.config_path)
        assert result.returncode == 0, result.stderr
        rows = [json.loads(line) for line in result.stdout.splitlines()]
        if wanted(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.3)


def test_every_released_association_is_logged_as_released(serve_process):
    """The connection may close (EVT_CONN_CLOSE, on the network thread) a moment before
    the association thread triggers EVT_RELEASED: the closing line still says released."""
    proc = serve_process(network={"workers": 1})
    for _ in range(40):
        assoc = associate(proc, ae_title="RELEASER")
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert assoc.is_released
    assert proc.terminate() == 0
    outcomes = re.findall(r"association #\d+ RELEASER@127\.0\.0\.1:\d+ -> MINIPACS: (.*?) after",
                          proc.log_text())
    assert outcomes == ["released"] * 40


def test_store_rows_of_a_running_association_survive_sigkill(serve_process):
    """Rows reach the index while the association is open, a later count as an update."""
    proc = serve_process()
    study = make_study(patient_id=PID, series=1, per_series=3)
    study_uid = str(study[0].StudyInstanceUID)
    assoc = associate(proc, contexts=[CTImageStorage], ae_title="MODALITY")
    assert [assoc.send_c_store(ds).Status for ds in study[:2]] == [0, 0]
    rows = store_rows(proc, lambda rows: rows)
    assert [(r["calling_ae"], r["count"], r["studies"]) for r in rows] == [
        ("MODALITY", 2, [study_uid])]
    assert assoc.send_c_store(study[2]).Status == 0
    assert [r["count"] for r in store_rows(proc, lambda rows: rows[0]["count"] == 3)] == [3]
    assert assoc.is_established  # never released: the rows were written while it ran
    proc.proc.send_signal(signal.SIGKILL)
    assert proc.proc.wait(30) == -signal.SIGKILL
    assoc.abort()
    rows = store_rows(proc, lambda rows: True)
    assert [(r["calling_ae"], r["status"], r["count"], r["patient_id"], r["studies"])
            for r in rows] == [("MODALITY", 0, 3, PID, [study_uid])]
    assert "MODALITY@" not in proc.log_text()  # its association never closed


def test_debug_shows_patient_names_and_each_store(serve_process):
    proc = serve_process(args=("--log-level", "DEBUG"), logging={"level": "WARNING"})
    study = make_study(patient_id=PID, series=1, per_series=2)
    for ds in study:
        ds.PatientName = NAME
    assert [s.Status for s in send_datasets(proc, study, ae_title="MODALITY")] == [0, 0]
    assert [s.Status for s in find(proc)] == [0xFF00, 0]
    assert proc.terminate() == 0
    text = proc.log_text()
    assert re.search(r"DEBUG \[\d+\] pacs\.operation: #\d+ C-FIND identifier: "
                     r"PatientName=SECRETNAME\* \(\+2 return keys\)", text), text
    for ds in study:
        assert re.search(rf"DEBUG \[\d+\] pacs\.services\.store: #\d+ C-STORE from MODALITY: "
                         rf"{re.escape(str(ds.SOPInstanceUID))} of study "
                         rf"{re.escape(str(ds.StudyInstanceUID))} stored, status 0x0000", text)
    # The INFO line still masks the name.
    assert "C-FIND from FINDSCU: Study Root STUDY PatientName=*** (+2 return keys)" in text
    assert "peewee" not in text and "INSERT" not in text  # no SQL parameters, no headers


def test_failed_operation_logs_a_warning_with_its_status(serve_process):
    proc = serve_process()
    keys = identifier("STUDY", StudyInstanceUID="1.2.3", PatientName="DOE^J", PatientID="PID9",
                      PatientBirthDate="19700101", AccessionNumber="ACC1",
                      StudyDescription="Knee, Dr Who", ModalitiesInStudy=["CT", "MR", "US", "XA"],
                      StudyDate="20240101-", StudyTime="")
    _, final, _ = retrieve(proc, keys, StudyRootMove, destination="NOWHERE")
    assert final.Status == 0xA801
    assert proc.terminate() == 0
    assert re.search(r"WARNING \[\d+\] pacs\.operation: #\d+ C-MOVE from RETRIEVER to NOWHERE: "
                     r"Study Root STUDY StudyDate=20240101- AccessionNumber=\*\*\* "
                     r"ModalitiesInStudy=CT\\MR\\US\\\.\.\. \(4 values\) StudyDescription=\*\*\* "
                     r"PatientName=\*\*\* PatientID=\*\*\* PatientBirthDate=\*\*\* "
                     r"StudyInstanceUID=1\.2\.3 \(\+1 return keys\): "
                     r"0 completed, 0 failed, 0 warning, status 0xA801 "
                     r"\(Move Destination 'NOWHERE' is not in remote_aes\)",
                     proc.log_text()), proc.log_text()
    result = run_pacs("audit", "--since", "10m", config=proc.config_path)
    assert re.fullmatch(r"\S+Z move RETRIEVER@127\.0\.0\.1:\d+ status=0xA801 count=0 to=NOWHERE "
                        r"patient=PID9 studies=1\.2\.3 \[Study Root STUDY StudyDate=20240101- "
                        r".* StudyInstanceUID=1\.2\.3 \(\+1 return keys\)\]\n",
                        result.stdout), result.stdout
    for secret in ("DOE", "19700101", "ACC1", "Knee"):
        assert secret not in proc.log_text() and secret not in result.stdout
    assert "PID9" not in proc.log_text()  # the audit trail keeps patient IDs, INFO logs do not


def test_bad_since_is_a_usage_error(tmp_path):
    for args in (["--since", "yesterday"], ["--since", "1h", "--until", "2024-13-01"]):
        result = run_pacs("audit", *args, config=tmp_path / "absent.yaml")
        assert result.returncode == 2
        assert result.stdout == ""
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith("pacs audit: cannot read '")


def test_shared_log_file_rotates_once_for_all_writers(tmp_path):
    """Two handlers on one file (as supervisor and workers have): each record lands exactly once."""
    path = tmp_path / "pacs.log"
    handlers = [SharedRotatingFileHandler(str(path), 400, 50) for _ in range(2)]
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(message)s"))
    for number in range(100):
        record = logging.makeLogRecord({"msg": f"record {number:03d} " + "x" * 20})
        handlers[number % 2].emit(record)
    for handler in handlers:
        handler.close()
    files = [path] + sorted(tmp_path.glob("pacs.log.[0-9]*"), key=lambda p: int(p.suffix[1:]))
    lines = [line for f in reversed(files) for line in f.read_text().splitlines()]
    assert lines == [f"record {n:03d} " + "x" * 20 for n in range(100)]
    assert all(f.stat().st_size <= 400 for f in files) and len(files) > 5


def test_workers_log_with_their_pid_to_stderr_and_the_shared_file(serve_process):
    proc = serve_process(args=("--log-level", "DEBUG"), network={"workers": 2},
                         logging={"file": "logs/pacs.log"})
    study = make_study(patient_id=PID, series=1, per_series=2)
    assert [s.Status for s in send_datasets(proc, study, ae_title="MODALITY")] == [0, 0]
    assert proc.terminate() == 0
    for text in (proc.log_text(), (proc.config_path.parent / "logs" / "pacs.log").read_text()):
        supervisor = re.findall(r"INFO \[(\d+)\] pacs\.supervisor: worker \d started \(pid (\d+)\)",
                                text)
        assert len(supervisor) == 2 and len({pid for pid, _ in supervisor}) == 1, text
        workers = {worker for _, worker in supervisor}
        store_line = re.search(r"INFO \[(\d+)\] pacs\.association: association #\d+ MODALITY@"
                               r".*C-STORE 2 \(stored 2 in 1 study, 0 failed\)", text)
        assert store_line and store_line[1] in workers, text
        # --log-level reaches the workers
        stores = re.findall(r"DEBUG \[(\d+)\] pacs\.services\.store: #\d+ C-STORE from "
                            r"MODALITY", text)
        assert stores == [store_line[1]] * 2, text
    audit = run_pacs("audit", "--since", "1h", "--type", "store", config=proc.config_path)
    assert re.fullmatch(rf"\S+Z store MODALITY@127\.0\.0\.1:\d+ status=0x0000 count=2 "
                        rf"patient={PID} studies={re.escape(str(study[0].StudyInstanceUID))}\n",
                        audit.stdout), audit.stdout
