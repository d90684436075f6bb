"""C-GET through the real protocol: DCMTK getscu and pynetdicom with SCP/SCU role selection."""
from __future__ import annotations

import socket
import subprocess
import threading

import pytest
from pydicom import dcmread
from pydicom.uid import RLELossless
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelGet as PatientRootGet,
    StudyRootQueryRetrieveInformationModelGet as StudyRootGet,
)

from tests.conftest import DCMTK, dataset_bytes, needs_dcmtk, stored_path
from tests.dicomgen import make_instance, make_study
from tests.retrieve_support import (
    UNCOMPRESSED, Receiver, compress, counts, failed_uids, fit_bits_stored, identifier, store,
)

pytestmark = pytest.mark.both_backends  # same results on SQLite and PostgreSQL


@needs_dcmtk
def test_getscu_series_comes_back_byte_for_byte(node, tmp_path):
    study = make_study(series=2, per_series=3)
    other = make_study(patient_id="OTHER", series=1, per_series=1)
    stored = store(node, study + other)
    series = [ds for ds in study if ds.SeriesInstanceUID == study[0].SeriesInstanceUID]
    out = tmp_path / "got"
    out.mkdir()
    result = subprocess.run(
        [str(DCMTK / "getscu"), "-S", "-aet", "GETSCU", "-aec", node.ae_title, "+B", "-od", str(out),
         "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study[0].StudyInstanceUID}",
         "-k", f"SeriesInstanceUID={study[0].SeriesInstanceUID}", "127.0.0.1", str(node.port)],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): dataset_bytes(p)
                for p in out.iterdir()}
    assert set(received) == {str(ds.SOPInstanceUID) for ds in series}
    assert all(received[uid] == stored[uid] for uid in received)


def test_get_every_level_with_pynetdicom(node):
    first = make_study(patient_id="PID1", series=2, per_series=2)
    mr = make_study(patient_id="PID1", series=1, per_series=2, modality="MR",
                    StudyDescription="MR STUDY")
    stored = store(node, first + mr)
    receiver = Receiver()
    _, final, _ = receiver.get(node, identifier("PATIENT", PatientID="PID1"), model=PatientRootGet,
                               classes=(CTImageStorage, MRImageStorage))
    assert final.Status == 0x0000 and counts(final) == (6, 0, 0)
    assert {uid: data for uid, (_, data) in receiver.received.items()} == stored
    receiver.received.clear()
    _, final, _ = receiver.get(node, identifier(
        "IMAGE", StudyInstanceUID=first[0].StudyInstanceUID,
        SeriesInstanceUID=first[0].SeriesInstanceUID,
        SOPInstanceUID=[first[0].SOPInstanceUID, first[1].SOPInstanceUID]))
    assert final.Status == 0x0000 and set(receiver.received) == {
        str(first[0].SOPInstanceUID), str(first[1].SOPInstanceUID)}


@needs_dcmtk
def test_get_compressed_as_stored_or_decompressed(node, tmp_path):
    plain = fit_bits_stored(make_instance(number=1))
    packed = compress(plain, tmp_path, "dcmcrle")
    stored = store(node, [packed])
    ident = identifier("IMAGE", SOPInstanceUID=plain.SOPInstanceUID)
    uid = str(plain.SOPInstanceUID)

    receiver = Receiver()
    _, final, _ = receiver.get(node, ident, syntaxes=[RLELossless])
    assert final.Status == 0x0000
    assert receiver.received[uid] == (RLELossless, stored[uid])

    receiver = Receiver()
    _, final, _ = receiver.get(node, ident)  # uncompressed only: decoded by pylibjpeg-rle
    assert final.Status == 0x0000
    syntax, data = receiver.received[uid]
    assert syntax in UNCOMPRESSED and plain.PixelData in data


def test_get_without_an_accepted_context_fails_every_instance(node):
    study = make_study(series=1, per_series=2)
    store(node, study)
    receiver = Receiver()
    _, final, failed = receiver.get(node, identifier("STUDY", StudyInstanceUID=study[0].StudyInstanceUID),
                                    classes=(MRImageStorage,))
    assert final.Status == 0xA702 and counts(final) == (0, 2, 0)
    assert failed_uids(failed) == {str(ds.SOPInstanceUID) for ds in study}
    assert not receiver.received


def test_get_cancel_and_pending_counts(node):
    study = make_study(series=1, per_series=25)
    store(node, study)
    receiver = Receiver(delay=0.01)
    pending, final, _ = receiver.get(node, identifier("STUDY", StudyInstanceUID=study[0].StudyInstanceUID),
                                     cancel_after_pending=1)
    assert pending and all(sum(counts(p)) + p.NumberOfRemainingSuboperations == 25 for p in pending)
    assert final.Status == 0xFE00
    assert sum(counts(final)) + final.NumberOfRemainingSuboperations == 25
    assert 0 < final.NumberOfRemainingSuboperations
    assert len(receiver.received) == final.NumberOfCompletedSuboperations


@pytest.mark.parametrize("ident", [
    identifier("SERIES", StudyInstanceUID="1.2.3"),
    identifier("WARD", StudyInstanceUID="1.2.3"),
])
def test_get_bad_identifier(node, ident):
    store(node, make_study(series=1, per_series=1))
    _, final, _ = Receiver().get(node, ident)
    assert final.Status == 0xA900 and final.ErrorComment


def test_get_vanished_file_is_failed_and_named(node):
    study = make_study(series=1, per_series=3)
    store(node, study)
    gone = str(study[0].SOPInstanceUID)
    stored_path(node.config, study[0]).unlink()
    receiver = Receiver()
    _, final, failed = receiver.get(node, identifier("STUDY", StudyInstanceUID=study[0].StudyInstanceUID))
    assert final.Status == 0xB000 and counts(final) == (2, 1, 0)
    assert failed_uids(failed) == {gone}
    assert set(receiver.received) == {str(ds.SOPInstanceUID) for ds in study[1:]}


def test_get_counts_each_status_the_requester_answers(node):
    study = make_study(series=1, per_series=6)
    store(node, study)
    uids = [str(ds.SOPInstanceUID) for ds in study]
    receiver = Receiver(answers={uids[0]: 0xA700, uids[1]: 0xB000, uids[2]: 0xC000})
    _, final, failed = receiver.get(node, identifier("STUDY", StudyInstanceUID=study[0].StudyInstanceUID))
    assert final.Status == 0xB000 and counts(final) == (3, 2, 1)
    assert failed_uids(failed) == {uids[0], uids[2]}


# the requester's own DUL thread raises when its handler answers after the abort
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("how", ["abort", "close"])
def test_get_requester_gone_mid_transfer_then_node_serves_again(node, how):
    """The handler reads the requester's PDUs during sub-operations: an A-ABORT among them,
    or the connection's end, still ends the association, and the next C-GET gets everything."""
    study = make_study(series=1, per_series=20)
    store(node, study)
    ident = identifier("STUDY", StudyInstanceUID=study[0].StudyInstanceUID)
    ae = AE("RETRIEVER")
    ae.dimse_timeout = 5  # after its abort, pynetdicom's send_c_get waits this long, then ends
    ae.add_requested_context(StudyRootGet)
    ae.add_requested_context(CTImageStorage, UNCOMPRESSED)
    received = []

    def on_store(event):
        received.append(str(event.request.AffectedSOPInstanceUID))
        if len(received) == 3:
            end = event.assoc.abort if how == "abort" else (
                lambda: event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR))
            threading.Thread(target=end).start()
        return 0x0000

    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title,
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    finals = [status for status, _ in assoc.send_c_get(ident, StudyRootGet)
              if status and status.Status not in (0xFF00, 0xFF01)]
    assoc.abort()  # no-op after its own abort; after a shutdown, closes its side
    assert not finals and 3 <= len(received) < 20
    receiver = Receiver()
    _, final, _ = receiver.get(node, ident)
    assert final.Status == 0x0000 and counts(final) == (20, 0, 0)
    assert set(receiver.received) == {str(ds.SOPInstanceUID) for ds in study}
