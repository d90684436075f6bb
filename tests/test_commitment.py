"""Storage Commitment Push Model with pynetdicom as the modality (DCMTK has no commitment SCU)."""
from __future__ import annotations

import threading
import time

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import N_EVENT_REPORT_RSP
from pynetdicom.sop_class import StorageCommitmentPushModel

from tests.conftest import free_port, stored_file
from tests.dicomgen import make_study
from tests.retrieve_support import store

pytestmark = pytest.mark.both_backends  # same results on SQLite and PostgreSQL

INSTANCE = "1.2.840.10008.1.20.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


class Modality:
    """Asks for commitment and waits for the N-EVENT-REPORT, on either association."""

    def __init__(self):
        self.ae = AE("MODALITY")
        self.ae.add_requested_context(StorageCommitmentPushModel)
        self.reports: list[tuple[int, Dataset, bool]] = []  # (event type, info, same association)
        self.arrived = threading.Event()
        self.port = free_port()
        self.server = None

    def listen(self, ssl_context=None) -> None:
        """Accept the archive's association for a report sent after we released (TLS with
        `ssl_context`)."""
        self.ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           ssl_context=ssl_context, evt_handlers=[
            (evt.EVT_N_EVENT_REPORT, self._on_report, [False])])

    def _on_report(self, event, same: bool) -> tuple[int, None]:
        self.reports.append((event.event_type, event.event_information, same))
        self.arrived.set()
        return 0x0000, None

    def request(self, node, refs: list[tuple[str, str]], keep_open: bool = True,
                info: Dataset | None = None) -> tuple[int, str]:
        if info is None:
            info = Dataset()
            info.TransactionUID = generate_uid()
            info.ReferencedSOPSequence = [_ref(cls, uid) for cls, uid in refs]
        answered = threading.Event()  # our N-EVENT-REPORT-RSP is out: safe to release
        assoc = self.ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, evt_handlers=[
            (evt.EVT_N_EVENT_REPORT, self._on_report, [True]),
            (evt.EVT_DIMSE_SENT, lambda event: isinstance(event.message, N_EVENT_REPORT_RSP)
             and answered.set())])
        assert assoc.is_established
        status, _ = assoc.send_n_action(info, 1, StorageCommitmentPushModel, INSTANCE)
        if keep_open and status.Status == 0:
            assert answered.wait(10), "no N-EVENT-REPORT on the association"
            time.sleep(0.05)  # pynetdicom fires EVT_DIMSE_SENT just before it queues the PDUs
        assoc.release()
        return status.Status, status.get("ErrorComment", "")

    def report(self) -> tuple[int, dict[str, int | None], bool]:
        """The one report: event type, {SOP Instance UID: failure reason or None}, same assoc."""
        assert self.arrived.wait(10), "no N-EVENT-REPORT"
        assert len(self.reports) == 1
        event_type, info, same = self.reports[0]
        outcome = {item.ReferencedSOPInstanceUID: None
                   for item in info.get("ReferencedSOPSequence", [])}
        outcome.update({item.ReferencedSOPInstanceUID: item.FailureReason
                        for item in info.get("FailedSOPSequence", [])})
        return event_type, outcome, same

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def _ref(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_uid
    return item


@pytest.fixture
def modality():
    modality = Modality()
    yield modality
    modality.stop()


@pytest.fixture
def stored(node):
    study = make_study(series=1, per_series=3)
    store(node, study)
    return [(CT, str(ds.SOPInstanceUID)) for ds in study]


def test_all_present_reported_on_the_same_association(node, modality, stored):
    assert modality.request(node, stored)[0] == 0x0000
    event_type, outcome, same = modality.report()
    assert event_type == 1 and same
    assert outcome == {uid: None for _, uid in stored}


def test_some_missing_are_failed_with_reason_0112(node, modality, stored):
    unknown = generate_uid()
    assert modality.request(node, stored + [(CT, unknown)])[0] == 0x0000
    event_type, outcome, _ = modality.report()
    assert event_type == 2
    assert outcome == {**{uid: None for _, uid in stored}, unknown: 0x0112}


def test_file_deleted_behind_the_index_is_not_committed(node, modality, stored):
    stored_file(node.config, stored[0][1]).unlink()
    modality.request(node, stored)
    event_type, outcome, _ = modality.report()
    assert event_type == 2 and outcome[stored[0][1]] == 0x0112
    assert [outcome[uid] for _, uid in stored[1:]] == [None, None]


def test_report_goes_on_a_new_association_after_release(make_node, modality):
    node = make_node(remote_aes={"MODALITY": {"host": "127.0.0.1", "port": modality.port}})
    study = make_study(series=1, per_series=2)
    store(node, study)
    modality.listen()
    refs = [(CT, str(ds.SOPInstanceUID)) for ds in study]
    assert modality.request(node, refs, keep_open=False)[0] == 0x0000
    event_type, outcome, same = modality.report()
    assert event_type == 1 and outcome == {uid: None for _, uid in refs}
    assert not same


def test_request_without_transaction_uid_is_refused(node, modality, stored):
    info = Dataset()
    info.ReferencedSOPSequence = [_ref(*stored[0])]
    status, comment = modality.request(node, stored, info=info)
    assert status == 0x0120 and "TransactionUID" in comment
    assert not modality.arrived.wait(0.3)
