"""Access control (`security`, `remote_aes` permissions and check_host) through the real protocol."""
from __future__ import annotations

import json
import logging
import re
import subprocess

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage, StorageCommitmentPushModel, StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from tests.conftest import DCMTK, needs_dcmtk, run_pacs, stored_path
from tests.dicomgen import make_instance, write

NOT_PERMITTED, NOT_AUTHORIZED, SOP_CLASS_NOT_SUPPORTED = 0xC124, 0x0124, 0x0122
CALLING_NOT_RECOGNIZED, CALLED_NOT_RECOGNIZED = 3, 7
PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"
ALL_CONTEXTS = (Verification, CTImageStorage, StudyRootQueryRetrieveInformationModelFind,
                StudyRootQueryRetrieveInformationModelMove,
                StudyRootQueryRetrieveInformationModelGet, StorageCommitmentPushModel)


def try_associate(node, ae_title: str, called: str | None = None, received: list | None = None):
    """An association proposing every service; C-GET sub-operations land in `received`."""
    ae = AE(ae_title=ae_title)
    for context in ALL_CONTEXTS:
        ae.add_requested_context(context)
    # C-GET: the requester takes the storage SCP role (PS3.7 D.3.3.4)
    role = build_role(CTImageStorage, scp_role=True, scu_role=True)
    on_store = (evt.EVT_C_STORE, lambda event: received.append(event.request.AffectedSOPInstanceUID)
                or 0x0000) if received is not None else (evt.EVT_C_STORE, lambda event: 0xA700)
    return ae.associate("127.0.0.1", node.port, ae_title=called or node.ae_title, ext_neg=[role],
                        evt_handlers=[on_store])


def assert_rejected(assoc, reason: int) -> None:
    assert assoc.is_rejected and not assoc.is_established
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, reason)


def study_query() -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    return ds


def commitment_request(ds: Dataset) -> Dataset:
    info = Dataset()
    info.TransactionUID = generate_uid()
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    info.ReferencedSOPSequence = [item]
    return info


def operations(assoc, ds: Dataset) -> dict[str, Dataset]:
    """One request of each kind on `assoc`: the final status of each."""
    def last(responses):
        return [status for status, _ in responses][-1]

    retrieve_id = Dataset()
    retrieve_id.QueryRetrieveLevel = "STUDY"
    retrieve_id.StudyInstanceUID = ds.StudyInstanceUID
    action, _ = assoc.send_n_action(commitment_request(ds), 1, StorageCommitmentPushModel,
                                    PUSH_MODEL_INSTANCE)
    return {
        "echo": assoc.send_c_echo(),
        "store": assoc.send_c_store(ds),
        "find": last(assoc.send_c_find(study_query(), StudyRootQueryRetrieveInformationModelFind)),
        "move": last(assoc.send_c_move(retrieve_id, "NOWHERE",
                                       StudyRootQueryRetrieveInformationModelMove)),
        "get": last(assoc.send_c_get(retrieve_id, StudyRootQueryRetrieveInformationModelGet)),
        "commitment": action,
    }


def test_default_accepts_any_caller_and_called_ae_must_match(node):
    assoc = try_associate(node, "ANYONE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert_rejected(try_associate(node, "ANYONE", called="SOMEONEELSE"), CALLED_NOT_RECOGNIZED)


def test_called_ae_check_can_be_switched_off(make_node):
    node = make_node(security={"require_called_ae": False})
    assoc = try_associate(node, "ANYONE", called="SOMEONEELSE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_unknown_callers_rejected_when_not_allowed(make_node):
    node = make_node(security={"allow_unknown_callers": False},
                     remote_aes={"WS1": {"host": "127.0.0.1", "port": 11113}})
    assert_rejected(try_associate(node, "STRANGER"), CALLING_NOT_RECOGNIZED)
    # Both wrong: the called AE title is checked first.
    assert_rejected(try_associate(node, "STRANGER", called="OTHER"), CALLED_NOT_RECOGNIZED)
    assoc = try_associate(node, "WS1")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


@pytest.mark.parametrize("host, accepted", [
    ("127.0.0.1", True), ("localhost", True), ("127.0.0.2", False), ("192.0.2.7", False)])
def test_check_host(make_node, host, accepted):
    node = make_node(remote_aes={"WS1": {"host": host, "port": 11113, "check_host": True}})
    assoc = try_associate(node, "WS1")
    if accepted:
        assert assoc.is_established
        assoc.release()
    else:
        assert_rejected(assoc, CALLING_NOT_RECOGNIZED)
    # Unknown callers are still allowed by default, whatever their address.
    other = try_associate(node, "WS2")
    assert other.is_established
    other.release()


def test_every_operation_refused_without_permission(make_node, caplog):
    caplog.set_level(logging.WARNING, logger="pacs.access")
    node = make_node(security={"allow_unknown_callers": False},
                     remote_aes={"NOBODY": {"host": "127.0.0.1", "port": 11113,
                                            "permissions": []}})
    ds = make_instance()
    assoc = try_associate(node, "NOBODY")
    assert assoc.is_established
    answers = operations(assoc, ds)
    assoc.release()
    codes = {name: answer.Status for name, answer in answers.items()}
    assert codes == {"echo": SOP_CLASS_NOT_SUPPORTED, "store": NOT_PERMITTED,
                     "find": NOT_PERMITTED, "move": NOT_PERMITTED, "get": NOT_PERMITTED,
                     "commitment": NOT_AUTHORIZED}
    assert all(answer.ErrorComment == "not permitted" for answer in answers.values())
    assert not stored_path(node.config, ds).exists()
    # One WARNING each, tied to the association by its number, with the status answered.
    refusals = [re.fullmatch(r"#(\d+) (\S+) from NOBODY refused \((0x\w{4})\): (\w+) not permitted",
                             record.getMessage()) for record in caplog.records
                if record.name == "pacs.access" and "refused" in record.getMessage()]
    assert all(refusals) and len({match[1] for match in refusals}) == 1, caplog.text
    assert sorted(match.groups()[1:] for match in refusals) == [
        ("C-ECHO", "0x0122", "echo"), ("C-FIND", "0xC124", "find"), ("C-GET", "0xC124", "get"),
        ("C-MOVE", "0xC124", "move"), ("C-STORE", "0xC124", "store"),
        ("N-ACTION", "0x0124", "store")]
    assert_rejected(try_associate(node, "STRANGER"), CALLING_NOT_RECOGNIZED)

    node.stop()  # waits for the associations' audit rows
    events = audit_events(node.config_path)
    assert {event["calling_ae"] for event in events} == {"NOBODY", "STRANGER"}
    assert all(re.fullmatch(r"127\.0\.0\.1:\d+", event["peer"]) for event in events)
    refused = {event["event"]: (event["status"], event["count"], event["failed"])
               for event in events if event["calling_ae"] == "NOBODY"}
    assert refused == {"store": (NOT_PERMITTED, 0, 1), "find": (NOT_PERMITTED, 0, 0),
                       "move": (NOT_PERMITTED, 0, 0), "get": (NOT_PERMITTED, 0, 0)}
    store = next(event for event in events if event["event"] == "store")
    assert (store["detail"], store["studies"]) == ("not permitted", [])
    rejected = [event for event in events if event["calling_ae"] == "STRANGER"]
    assert [(event["event"], event["status"], event["detail"]) for event in rejected] == [
        ("reject", CALLING_NOT_RECOGNIZED, "A-ASSOCIATE-RJ Rejected Permanent, Service User: "
                                           "Calling AE title not recognised; called MINIPACS")]
    plain = run_pacs("audit", "--since", "1h", "--type", "reject", config=node.config_path)
    assert re.fullmatch(r"\S+Z reject STRANGER@127\.0\.0\.1:\d+ reason=3 count=0 "
                        r"\[A-ASSOCIATE-RJ .*\]\n", plain.stdout), plain.stdout


def audit_events(config_path) -> list[dict]:
    """`pacs audit --json` of the last hour, parsed."""
    result = run_pacs("audit", "--since", "1h", "--json", config=config_path)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_permissions_are_per_operation(make_node):
    node = make_node(remote_aes={
        "MODALITY": {"host": "127.0.0.1", "port": 11113, "permissions": ["store"]},
        "WS": {"host": "127.0.0.1", "port": 11114, "permissions": ["echo", "find", "get"]},
    })
    ds = make_instance()
    modality = try_associate(node, "MODALITY")
    assert modality.send_c_store(ds).Status == 0
    assert [s.Status for s, _ in modality.send_c_find(
        study_query(), StudyRootQueryRetrieveInformationModelFind)] == [NOT_PERMITTED]
    modality.release()
    assert stored_path(node.config, ds).is_file()

    received: list[str] = []
    ws = try_associate(node, "WS", received=received)
    refused = ws.send_c_store(make_instance(number=2))
    assert (refused.Status, refused.ErrorComment) == (NOT_PERMITTED, "not permitted")
    found = [(s.Status, i.StudyInstanceUID if i else None) for s, i in ws.send_c_find(
        study_query(), StudyRootQueryRetrieveInformationModelFind)]
    assert found == [(0xFF00, ds.StudyInstanceUID), (0x0000, None)]
    retrieve_id = Dataset()
    retrieve_id.QueryRetrieveLevel = "STUDY"
    retrieve_id.StudyInstanceUID = ds.StudyInstanceUID
    got = [s.Status for s, _ in ws.send_c_get(retrieve_id, StudyRootQueryRetrieveInformationModelGet)]
    assert got[-1] == 0x0000
    assert received == [ds.SOPInstanceUID]
    moved = [s for s, _ in ws.send_c_move(retrieve_id, "WS", StudyRootQueryRetrieveInformationModelMove)]
    assert (moved[-1].Status, moved[-1].ErrorComment) == (NOT_PERMITTED, "not permitted")
    ws.release()


@needs_dcmtk
def test_dcmtk_clients_see_rejection_and_refusal(make_node, tmp_path):
    node = make_node(security={"allow_unknown_callers": False}, remote_aes={
        "WS": {"host": "127.0.0.1", "port": 11114, "permissions": ["echo", "find"]}})
    port = str(node.port)
    rejected = subprocess.run([str(DCMTK / "echoscu"), "-aet", "STRANGER", "-aec", "MINIPACS",
                               "127.0.0.1", port], capture_output=True, text=True, timeout=30)
    assert rejected.returncode != 0
    assert "Calling AE Title Not Recognized" in rejected.stdout + rejected.stderr
    echo = subprocess.run([str(DCMTK / "echoscu"), "-aet", "WS", "-aec", "MINIPACS",
                           "127.0.0.1", port], capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stdout + echo.stderr
    path = write(make_instance(), tmp_path / "ct.dcm")
    store = subprocess.run([str(DCMTK / "storescu"), "-d", "-aet", "WS", "-aec", "MINIPACS",
                            "127.0.0.1", port, str(path)], capture_output=True, text=True,
                           timeout=30)
    output = store.stdout + store.stderr
    assert "0xc124" in output.lower(), output
    assert "not permitted" in output
