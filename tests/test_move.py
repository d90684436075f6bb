"""C-MOVE through the real protocol: DCMTK movescu/storescp and pynetdicom, every level."""
from __future__ import annotations

import subprocess
import threading

import pytest
from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelMove as PatientRootMove,
    StudyRootQueryRetrieveInformationModelMove as StudyRootMove,
    Verification,
    _STORAGE_CLASSES,
)

from pacs.maintenance import verify
from tests.conftest import DCMTK, free_port, needs_dcmtk, stored_path
from tests.dicomgen import make_instance, make_study, uid
from tests.retrieve_support import (
    DcmtkStoreSCP, RecordingSCP, compress, counts, failed_uids, fit_bits_stored, identifier,
    retrieve, store,
)

pytestmark = pytest.mark.both_backends  # same results on SQLite and PostgreSQL


@pytest.fixture
def destinations(tmp_path):
    """Factory for C-MOVE destinations, stopped at teardown: .dcmtk(*options) or .recording(**kw)."""
    started = []

    class Destinations:
        def dcmtk(self, *options: str, ae_title: str = "DEST") -> DcmtkStoreSCP:
            started.append(DcmtkStoreSCP(tmp_path / f"dest{len(started)}", ae_title, *options))
            return started[-1]

        def recording(self, **kwargs) -> RecordingSCP:
            started.append(RecordingSCP(**kwargs))
            return started[-1]

    yield Destinations()
    for dest in started:
        dest.stop()


def move(node, ident, dest: str = "DEST", model=StudyRootMove, **kwargs):
    return retrieve(node, ident, model, destination=dest, **kwargs)


def node_to(make_node, dest, **extra):
    return make_node(remote_aes={dest.ae_title: {"host": "127.0.0.1", "port": dest.port}, **extra})


@pytest.fixture
def compressed_series(tmp_path):
    """A series of 3 plain instances plus one RLE and one JPEG Lossless copy."""
    study = make_study(series=1, per_series=3)
    base = study[0]
    extra = [fit_bits_stored(make_instance(study=base.StudyInstanceUID,
                                           series=base.SeriesInstanceUID, number=n))
             for n in (10, 11)]
    packed = [compress(extra[0], tmp_path, "dcmcrle"),
              compress(extra[1], tmp_path, "dcmcjpeg", "+e1")]
    return study, packed, {str(ds.SOPInstanceUID): ds for ds in extra}


@needs_dcmtk
def test_movescu_to_storescp_sends_files_byte_for_byte(make_node, destinations, compressed_series):
    plain, packed, _ = compressed_series
    dest = destinations.dcmtk("+xa")  # accepts the compressed syntaxes too
    node = node_to(make_node, dest)
    other = make_study(patient_id="OTHER", series=1, per_series=2)
    stored = store(node, plain + packed + other)
    series = plain[0]
    result = subprocess.run(
        [str(DCMTK / "movescu"), "-S", "-aet", "MOVESCU", "-aec", node.ae_title, "-aem", "DEST",
         "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={series.StudyInstanceUID}",
         "-k", f"SeriesInstanceUID={series.SeriesInstanceUID}", "127.0.0.1", str(node.port)],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    received = dest.received()
    expected = {str(ds.SOPInstanceUID) for ds in plain + packed}
    assert set(received) == expected
    for sop_uid in expected:
        assert received[sop_uid] == stored[sop_uid], sop_uid
    syntaxes = {str(dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
                for p in dest.folder.iterdir()}
    assert RLELossless in syntaxes and "1.2.840.10008.1.2.4.70" in syntaxes


@needs_dcmtk
def test_move_decompresses_for_a_destination_without_compression(make_node, destinations,
                                                                  compressed_series):
    plain, packed, originals = compressed_series
    dest = destinations.dcmtk()  # storescp's default: uncompressed syntaxes only
    node = node_to(make_node, dest)
    stored = store(node, plain + packed)
    pending, final, _ = move(node, identifier("SERIES", StudyInstanceUID=plain[0].StudyInstanceUID,
                                              SeriesInstanceUID=plain[0].SeriesInstanceUID))
    assert final.Status == 0x0000 and counts(final) == (5, 0, 0)
    received = dest.received()
    assert set(received) == set(stored)
    for ds in plain:
        assert received[str(ds.SOPInstanceUID)] == stored[str(ds.SOPInstanceUID)]
    for path in dest.folder.iterdir():
        got = dcmread(path)
        original = originals.get(str(got.SOPInstanceUID))
        if original is not None:  # decoded by pylibjpeg-rle / pylibjpeg-libjpeg, sent uncompressed
            assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
            assert got.PixelData == original.PixelData


@needs_dcmtk
def test_move_converts_to_the_only_accepted_uncompressed_syntax(make_node, destinations):
    dest = destinations.dcmtk("+xi")  # Implicit VR Little Endian only
    node = node_to(make_node, dest)
    study = make_study(series=1, per_series=2)
    store(node, study)
    _, final, _ = move(node, identifier("STUDY", StudyInstanceUID=study[0].StudyInstanceUID))
    assert final.Status == 0x0000 and counts(final) == (2, 0, 0)
    for path in dest.folder.iterdir():
        got = dcmread(path)
        assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        sent = next(ds for ds in study if ds.SOPInstanceUID == got.SOPInstanceUID)
        assert got.PixelData == sent.PixelData and got.PatientName == sent.PatientName


def test_move_at_every_level_of_both_roots(make_node, destinations):
    dest = destinations.recording()
    node = node_to(make_node, dest)
    first = make_study(patient_id="PID1", series=2, per_series=2)
    second = make_study(patient_id="PID1", series=1, per_series=2, StudyDescription="SECOND")
    other = make_study(patient_id="PID2", series=1, per_series=1)
    store(node, first + second + other)
    uids = lambda datasets: {str(ds.SOPInstanceUID) for ds in datasets}  # noqa: E731
    series0 = [ds for ds in first if ds.SeriesInstanceUID == first[0].SeriesInstanceUID]
    cases = [
        (PatientRootMove, identifier("PATIENT", PatientID="PID1"), first + second),
        (PatientRootMove, identifier("STUDY", PatientID="PID1", StudyInstanceUID=[
            first[0].StudyInstanceUID, second[0].StudyInstanceUID]), first + second),
        (PatientRootMove, identifier("SERIES", PatientID="PID1",
                                     StudyInstanceUID=first[0].StudyInstanceUID,
                                     SeriesInstanceUID=first[0].SeriesInstanceUID), series0),
        (StudyRootMove, identifier("STUDY", StudyInstanceUID=second[0].StudyInstanceUID), second),
        (StudyRootMove, identifier("SERIES", SeriesInstanceUID=[
            first[0].SeriesInstanceUID, other[0].SeriesInstanceUID]), series0 + other),
        (StudyRootMove, identifier("IMAGE", StudyInstanceUID=first[0].StudyInstanceUID,
                                   SeriesInstanceUID=first[0].SeriesInstanceUID,
                                   SOPInstanceUID=[first[0].SOPInstanceUID, first[1].SOPInstanceUID]),
         first[:2]),
    ]
    for model, ident, expected in cases:
        dest.received.clear()
        _, final, _ = move(node, ident, model=model)
        assert final.Status == 0x0000, (ident, final)
        assert counts(final) == (len(expected), 0, 0)
        assert set(dest.received) == uids(expected), ident
    # exactly the SOP class and stored syntax, plus the uncompressed fallback
    assert dest.proposals[-1] == [("1.2.840.10008.5.1.4.1.1.2", ("1.2.840.10008.1.2.1",)),
                                  ("1.2.840.10008.5.1.4.1.1.2", ("1.2.840.10008.1.2",))]


@pytest.mark.parametrize("ident, model, words", [
    (identifier("", StudyInstanceUID="1.2.3"), StudyRootMove, "missing"),
    (identifier("FOO", StudyInstanceUID="1.2.3"), StudyRootMove, "FOO"),
    (identifier("PATIENT", PatientID="PID1"), StudyRootMove, "PATIENT"),
    (identifier("SERIES", StudyInstanceUID="1.2.3"), StudyRootMove, "SeriesInstanceUID"),
    (identifier("IMAGE", SOPInstanceUID=""), StudyRootMove, "SOPInstanceUID"),
    (identifier("SERIES", StudyInstanceUID=["1.2.3", "1.2.4"], SeriesInstanceUID="1.2.5"),
     StudyRootMove, "single"),
    (identifier("STUDY", PatientID=["A", "B"], StudyInstanceUID="1.2.3"), PatientRootMove, "single"),
])
def test_bad_identifier_fails_with_a_comment(make_node, destinations, ident, model, words):
    dest = destinations.recording()
    node = node_to(make_node, dest)
    store(node, make_study(series=1, per_series=1))
    pending, final, _ = move(node, ident, model=model)
    assert final.Status == 0xA900 and words in final.ErrorComment
    assert not pending and not dest.received


def test_unknown_uid_is_success_with_no_suboperations(make_node, destinations):
    dest = destinations.recording()
    node = node_to(make_node, dest)
    store(node, make_study(series=1, per_series=1))
    _, final, _ = move(node, identifier("STUDY", StudyInstanceUID=generate_uid()))
    assert final.Status == 0x0000 and counts(final) == (0, 0, 0)
    assert not dest.proposals


def test_unknown_destination_is_refused_with_a_comment(make_node, destinations):
    dest = destinations.recording()
    node = node_to(make_node, dest)
    study = make_study(series=1, per_series=2)
    store(node, study)
    _, final, _ = move(node, identifier("STUDY", StudyInstanceUID=study[0].StudyInstanceUID),
                       dest="NOWHERE")
    assert final.Status == 0xA801 and "NOWHERE" in final.ErrorComment
    assert "NumberOfCompletedSuboperations" not in final and not dest.proposals


@pytest.mark.parametrize("trouble", ["nobody listens", "rejects"])
def test_unreachable_destination_fails_every_instance(make_node, destinations, trouble):
    dest = destinations.recording(ae_title="ELSEWHERE")  # requires this called AE title
    port = dest.port if trouble == "rejects" else free_port()
    node = make_node(remote_aes={"DEST": {"host": "127.0.0.1", "port": port}})
    study = make_study(series=1, per_series=3)
    store(node, study)
    _, final, ident = move(node, identifier("STUDY", StudyInstanceUID=study[0].StudyInstanceUID))
    assert final.Status == 0xA702 and final.ErrorComment
    assert counts(final) == (0, 3, 0)
    assert failed_uids(ident) == {str(ds.SOPInstanceUID) for ds in study}


def test_destination_aborting_halfway_is_counted_and_the_archive_goes_on(make_node, destinations):
    aborting = destinations.recording(abort_after=2)
    healthy = destinations.recording(ae_title="GOOD")
    node = make_node(remote_aes={"DEST": {"host": "127.0.0.1", "port": aborting.port},
                                 "GOOD": {"host": "127.0.0.1", "port": healthy.port}})
    study = make_study(series=2, per_series=3)
    store(node, study)
    ident = identifier("STUDY", StudyInstanceUID=study[0].StudyInstanceUID)
    _, final, failed = move(node, ident)
    assert final.Status == 0xB000
    assert counts(final) == (2, 4, 0)
    assert failed_uids(failed) == (
        {str(ds.SOPInstanceUID) for ds in study} - set(aborting.received))
    _, final, _ = move(node, ident, dest="GOOD")
    assert final.Status == 0x0000 and len(healthy.received) == 6


def test_vanished_file_is_failed_named_and_verified(make_node, destinations):
    dest = destinations.recording()
    node = node_to(make_node, dest)
    study = make_study(series=1, per_series=3)
    store(node, study)
    gone = str(study[1].SOPInstanceUID)
    stored_path(node.config, study[1]).unlink()
    _, final, failed = move(node, identifier("STUDY", StudyInstanceUID=study[0].StudyInstanceUID))
    assert final.Status == 0xB000 and counts(final) == (2, 1, 0)
    assert failed_uids(failed) == {gone}
    assert gone not in dest.received
    assert any(gone in problem for problem in verify(node.archive, progress=False))


def test_pending_responses_and_cancel(make_node, destinations):
    dest = destinations.recording(delay=0.01)
    node = node_to(make_node, dest)
    study = make_study(series=1, per_series=25)
    store(node, study)
    ident = identifier("STUDY", StudyInstanceUID=study[0].StudyInstanceUID)
    pending, final, _ = move(node, ident)
    assert final.Status == 0x0000 and counts(final) == (25, 0, 0)
    assert len(pending) >= 2
    for status in pending:
        done = sum(counts(status))
        assert done + status.NumberOfRemainingSuboperations == 25
    dest.received.clear()
    pending, final, _ = move(node, ident, cancel_after_pending=1)
    assert final.Status == 0xFE00
    assert sum(counts(final)) + final.NumberOfRemainingSuboperations == 25
    assert final.NumberOfRemainingSuboperations > 0
    assert len(dest.received) == final.NumberOfCompletedSuboperations


def test_concurrent_moves_all_complete(make_node, destinations):
    dest = destinations.recording()
    node = node_to(make_node, dest)
    studies = [make_study(patient_id=f"P{i}", series=1, per_series=8) for i in range(4)]
    store(node, [ds for study in studies for ds in study])
    finals = {}

    def run(index):
        finals[index] = move(node, identifier("STUDY",
                                              StudyInstanceUID=studies[index][0].StudyInstanceUID))[1]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(finals[i].Status == 0x0000 and counts(finals[i]) == (8, 0, 0) for i in range(4))
    assert set(dest.received) == {str(ds.SOPInstanceUID) for s in studies for ds in s}


def test_more_than_128_contexts_take_several_associations(make_node, destinations):
    dest = destinations.recording()
    node = node_to(make_node, dest)
    study_uid = uid("many-classes")
    classes = sorted(set(_STORAGE_CLASSES.values()))[:70]
    datasets = []
    for number, sop_class in enumerate(classes):
        ds = make_instance(study=study_uid, number=number)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        datasets.append(ds)
    store(node, datasets)
    _, final, _ = move(node, identifier("STUDY", StudyInstanceUID=study_uid))
    assert final.Status == 0x0000 and counts(final) == (70, 0, 0)
    assert len(dest.proposals) == 2 and all(len(p) <= 128 for p in dest.proposals)
    assert {cls for proposals in dest.proposals for cls, _ in proposals} == set(classes)
    assert set(dest.received) == {str(ds.SOPInstanceUID) for ds in datasets}


def test_move_outlasting_the_network_timeout_keeps_the_association(make_node, destinations):
    """The requester says nothing while it waits: the responses we send count as traffic."""
    dest = destinations.recording(delay=0.3)
    node = make_node(network={"network_timeout": 1},
                     remote_aes={dest.ae_title: {"host": "127.0.0.1", "port": dest.port}})
    study = make_study(series=1, per_series=6)
    store(node, study)
    ae = AE("RETRIEVER")
    ae.add_requested_context(StudyRootMove)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        ident = identifier("STUDY", StudyInstanceUID=study[0].StudyInstanceUID)
        final = [status for status, _ in assoc.send_c_move(ident, dest.ae_title, StudyRootMove)
                 if status.Status not in (0xFF00, 0xFF01)]
        assert [s.Status for s in final] == [0x0000] and counts(final[0]) == (6, 0, 0)
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.is_established
    finally:
        assoc.release()
