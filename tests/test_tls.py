"""DICOM over TLS through the real protocol: pynetdicom and DCMTK clients, one and two workers,
handshake failures, the plain port switched off, C-MOVE to TLS destinations, config checks."""
from __future__ import annotations

import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelGet as PatientRootGet,
    StudyRootQueryRetrieveInformationModelFind as StudyRootFind,
    StudyRootQueryRetrieveInformationModelMove as StudyRootMove,
    Verification,
)

from pacs.tls import SerializedSSLSocket
from pacs.transport import BulkSocket
from tests.conftest import (
    DCMTK, HAVE_DCMTK, dataset_bytes, free_port, run_pacs, send_datasets, stored_path, write_config,
)
from tests.dicomgen import make_study
from tests.retrieve_support import RecordingSCP, counts, failed_uids, identifier, retrieve
from tests.test_access import CALLING_NOT_RECOGNIZED, NOT_PERMITTED, assert_rejected
from tests.test_commitment import Modality
from tests.test_config import assert_config_error
from tests.tls_support import Certificates


def _dcmtk_has_tls() -> bool:
    if not HAVE_DCMTK:
        return False
    help_text = subprocess.run([str(DCMTK / "echoscu"), "--help"], capture_output=True, text=True)
    return "+tls" in help_text.stdout


needs_dcmtk_tls = pytest.mark.skipif(not _dcmtk_has_tls(),
                                     reason="DCMTK with TLS support not installed (apt-get install dcmtk)")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("certs"))


def tls_args(context: ssl.SSLContext) -> tuple[ssl.SSLContext, str]:
    return context, "127.0.0.1"  # the server certificate names IP:127.0.0.1


def tls_associate(port: int, context: ssl.SSLContext, contexts=(Verification,),
                  calling: str = "TLSSCU", **kwargs):
    """An association over TLS (not asserted: handshakes may be meant to fail)."""
    ae = AE(ae_title=calling)
    ae.connection_timeout = 20  # a blocked server fails the test instead of hanging it
    for context_uid in contexts:
        ae.add_requested_context(context_uid)
    return ae.associate("127.0.0.1", port, ae_title="MINIPACS", tls_args=tls_args(context), **kwargs)


def tls_echo(port: int, context: ssl.SSLContext) -> int | None:
    """C-ECHO over TLS: its status, or None when no association came about."""
    assoc = tls_associate(port, context)
    if not assoc.is_established:
        return None
    try:
        return assoc.send_c_echo().Status
    finally:
        assoc.release()


def dcmtk_tls(tool: str, certs: Certificates, port: int, *args: str,
              key: Path | None = None, cert: Path | None = None) -> subprocess.CompletedProcess:
    """A DCMTK TLS client (`+tls key cert +cf ca`) against our TLS port."""
    return subprocess.run(
        [str(DCMTK / tool), "-aec", "MINIPACS", "+tls", str(key or certs.client_key),
         str(cert or certs.client), "+cf", str(certs.ca), "127.0.0.1", str(port), *args],
        capture_output=True, text=True, timeout=60)


def tls_node(make_node, certs: Certificates, tls: dict | None = None, **overrides):
    return make_node(tls=certs.tls_config(port=free_port(), **(tls or {})), **overrides)


def assert_refused(port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_echo_and_store_over_tls_beside_the_plain_port(make_node, certs):
    node = tls_node(make_node, certs)
    port = node.config.tls.port
    study = make_study(series=1, per_series=3)
    assoc = tls_associate(port, certs.client_context(), (Verification, CTImageStorage))
    assert assoc.is_established
    assert isinstance(assoc.dul.socket.socket, ssl.SSLSocket)
    # the server side: TLS socket tuned like a plain one (Nagle off, bulk reads)
    (accepted,) = [a for server in node.node.servers for a in server.active_associations]
    assert type(accepted.dul.socket) is BulkSocket
    assert isinstance(accepted.dul.socket.socket, SerializedSSLSocket)
    assert accepted.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    try:
        assert assoc.send_c_echo().Status == 0
        assert [assoc.send_c_store(ds).Status for ds in study] == [0, 0, 0]
    finally:
        assoc.release()
    for ds in study:
        stored = dcmread(stored_path(node.config, ds))
        assert stored.PixelData == ds.PixelData and stored.PatientName == ds.PatientName
    # the plain port still listens
    plain = make_study(patient_id="PLAIN", series=1, per_series=2)
    assert [s.Status for s in send_datasets(node, plain)] == [0, 0]


@needs_dcmtk_tls
def test_dcmtk_tls_clients_echo_and_store_byte_for_byte(make_node, certs, tmp_path):
    node = tls_node(make_node, certs)
    port = node.config.tls.port
    echo = dcmtk_tls("echoscu", certs, port)
    assert echo.returncode == 0, echo.stdout + echo.stderr
    make_study(tmp_path / "study", series=2, per_series=2)
    files = sorted((tmp_path / "study").rglob("*.dcm"))
    store = dcmtk_tls("storescu", certs, port, *map(str, files))
    assert store.returncode == 0, store.stdout + store.stderr
    assert len(files) == 4
    for path in files:
        sent = dcmread(path, stop_before_pixels=True)
        assert dataset_bytes(stored_path(node.config, sent)) == dataset_bytes(path)


def test_handshake_fails_without_a_certificate_of_our_ca(make_node, certs):
    node = tls_node(make_node, certs)
    port = node.config.tls.port
    wrong_ca = certs.client_context(certs.other_client, certs.other_client_key)
    assert tls_echo(port, wrong_ca) is None
    assert tls_echo(port, certs.anonymous_context()) is None
    # a server certificate our client does not trust fails on the client side
    untrusting = ssl.create_default_context(cafile=str(certs.other_ca))
    untrusting.load_cert_chain(certs.client, certs.client_key)
    assert tls_echo(port, untrusting) is None
    assert tls_echo(port, certs.client_context()) == 0


@needs_dcmtk_tls
def test_dcmtk_handshake_fails_with_a_client_certificate_of_another_ca(make_node, certs):
    node = tls_node(make_node, certs)
    port = node.config.tls.port
    wrong = dcmtk_tls("echoscu", certs, port, key=certs.other_client_key, cert=certs.other_client)
    assert wrong.returncode != 0
    assert "Association Request Failed" in wrong.stdout + wrong.stderr
    anonymous = subprocess.run([str(DCMTK / "echoscu"), "-aec", "MINIPACS", "+tla", "+cf",
                                str(certs.ca), "127.0.0.1", str(port)],
                               capture_output=True, text=True, timeout=60)
    assert anonymous.returncode != 0
    assert dcmtk_tls("echoscu", certs, port).returncode == 0


def test_without_ca_certificates_no_client_certificate_is_asked_for(make_node, certs):
    node = make_node(tls={"port": free_port(), "certificate": str(certs.server),
                          "private_key": str(certs.server_key)})
    assert tls_echo(node.config.tls.port, certs.anonymous_context()) == 0


def test_a_silent_client_does_not_hold_up_the_tls_port(make_node, certs):
    """The handshake runs in the connection's thread, not in the accept loop."""
    node = tls_node(make_node, certs)
    port = node.config.tls.port
    with socket.create_connection(("127.0.0.1", port)):  # connects and never says hello
        assert tls_echo(port, certs.client_context()) == 0


def test_plain_port_off_refuses_plain_connections(make_node, certs):
    node = tls_node(make_node, certs, tls={"plain_port": False})
    assert node.port == node.config.tls.port
    assert_refused(node.config.port)
    assert tls_echo(node.config.tls.port, certs.client_context()) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_process_tls_only(serve_process, certs, workers):
    """`pacs serve` with one process and with the supervisor handing TLS sockets to workers."""
    proc = serve_process(tls_args=tls_args(certs.client_context()), network={"workers": workers},
                         tls=certs.tls_config(port=free_port(), plain_port=False))
    port = proc.config.tls.port
    assert_refused(proc.port)
    wrong_ca = certs.client_context(certs.other_client, certs.other_client_key)
    for _ in range(3):  # the port keeps serving after failed handshakes
        assert tls_echo(port, wrong_ca) is None
    study = make_study(series=2, per_series=5)
    assoc = tls_associate(port, certs.client_context(), (CTImageStorage,))
    assert assoc.is_established
    assert [assoc.send_c_store(ds).Status for ds in study] == [0] * 10
    assoc.release()
    if _dcmtk_has_tls():
        echo = dcmtk_tls("echoscu", certs, port)
        assert echo.returncode == 0, echo.stdout + echo.stderr
    assert proc.terminate() == 0
    stats = run_pacs("stats", config=proc.config_path)
    assert "instances: 10" in stats.stdout.splitlines()


def test_access_control_on_the_tls_port(make_node, certs):
    """The rules of the plain port: an unknown caller rejected, operations per permission."""
    node = tls_node(make_node, certs, tls={"plain_port": False},
                    security={"allow_unknown_callers": False}, remote_aes={
                        "MODALITY": {"host": "127.0.0.1", "port": 11113, "permissions": ["store"]}})
    port = node.config.tls.port
    assert node.port == port
    assert_rejected(tls_associate(port, certs.client_context(), calling="STRANGER"),
                    CALLING_NOT_RECOGNIZED)
    assoc = tls_associate(port, certs.client_context(), (CTImageStorage, StudyRootFind),
                          calling="MODALITY")
    assert assoc.is_established
    assert isinstance(assoc.dul.socket.socket, ssl.SSLSocket)
    study = make_study(series=1, per_series=2)
    try:
        assert [assoc.send_c_store(ds).Status for ds in study] == [0, 0]
        found = [status for status, _ in assoc.send_c_find(
            identifier("STUDY", StudyInstanceUID=""), StudyRootFind)]
        assert [(s.Status, s.ErrorComment) for s in found] == [(NOT_PERMITTED, "not permitted")]
    finally:
        assoc.release()
    for ds in study:
        assert stored_path(node.config, ds).is_file()


def test_find_and_get_over_tls(make_node, certs):
    """Responses written by the handler thread while pynetdicom's thread reads the TLS socket."""
    node = tls_node(make_node, certs, tls={"plain_port": False})
    client = tls_args(certs.client_context())
    studies = [ds for n in range(12) for ds in make_study(patient_id="TLSFIND", series=1,
                                                         per_series=1, StudyDescription=f"S{n}")]
    assert [s.Status for s in send_datasets(node, studies, tls_args=client)] == [0] * 12
    assoc = tls_associate(node.port, certs.client_context(), (StudyRootFind,))
    assert assoc.is_established
    query = identifier("STUDY", PatientID="TLSFIND", StudyInstanceUID="")
    answers = list(assoc.send_c_find(query, StudyRootFind))
    assoc.release()
    assert [status.Status for status, _ in answers] == [0xFF00] * 12 + [0]
    assert {str(ident.StudyInstanceUID) for _, ident in answers[:-1]} == {
        str(ds.StudyInstanceUID) for ds in studies}
    received = {}

    def on_store(event) -> int:
        received[str(event.request.AffectedSOPInstanceUID)] = dataset_bytes(event.dataset_path)
        return 0

    _, final, _ = retrieve(
        node, identifier("PATIENT", PatientID="TLSFIND"), PatientRootGet,
        contexts=[(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])],
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)], tls_args=client)
    assert final.Status == 0 and counts(final) == (12, 0, 0)
    assert received == {str(ds.SOPInstanceUID): dataset_bytes(
        stored_path(node.config, ds)) for ds in studies}


def tls_destination(certs: Certificates, cert: Path, key: Path, client_ca: Path) -> RecordingSCP:
    return RecordingSCP(ssl_context=certs.server_context(cert, key, client_ca))


def test_move_to_a_tls_destination_sends_identical_bytes(make_node, certs):
    dest = tls_destination(certs, certs.server, certs.server_key, certs.ca)
    try:
        node = tls_node(make_node, certs, tls={"plain_port": False}, remote_aes={
            "DEST": {"host": "127.0.0.1", "port": dest.port, "tls": True}})
        client = tls_args(certs.client_context())
        study = make_study(series=2, per_series=3)
        assert [s.Status for s in send_datasets(node, study, tls_args=client)] == [0] * 6
        _, final, _ = retrieve(node, identifier("STUDY", StudyInstanceUID=study[0].StudyInstanceUID),
                               StudyRootMove, destination="DEST", tls_args=client)
        assert final.Status == 0 and counts(final) == (6, 0, 0)
        assert {uid: data for uid, (_, data) in dest.received.items()} == {
            str(ds.SOPInstanceUID): dataset_bytes(stored_path(node.config, ds))
            for ds in study}
    finally:
        dest.stop()


@needs_dcmtk_tls
def test_move_to_a_dcmtk_tls_storescp_byte_for_byte(make_node, certs, tmp_path):
    port, folder = free_port(), tmp_path / "received"
    folder.mkdir()
    with open(tmp_path / "storescp.log", "wb") as log:
        storescp = subprocess.Popen(
            [str(DCMTK / "storescp"), "-aet", "DEST", "+B", "-od", str(folder), "+tls",
             str(certs.server_key), str(certs.server), "+cf", str(certs.ca), str(port)],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while tls_echo(port, certs.client_context()) != 0:
            assert time.monotonic() < deadline, (tmp_path / "storescp.log").read_text()
            time.sleep(0.1)
        node = tls_node(make_node, certs, remote_aes={
            "DEST": {"host": "127.0.0.1", "port": port, "tls": True}})
        study = make_study(series=1, per_series=3)
        assert [s.Status for s in send_datasets(node, study)] == [0] * 3
        _, final, _ = retrieve(node, identifier("STUDY", StudyInstanceUID=study[0].StudyInstanceUID),
                               StudyRootMove, destination="DEST")
        assert final.Status == 0 and counts(final) == (3, 0, 0)
        received = {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID): dataset_bytes(path)
                    for path in folder.iterdir()}
        assert received == {str(ds.SOPInstanceUID): dataset_bytes(
            stored_path(node.config, ds)) for ds in study}
    finally:
        storescp.terminate()
        storescp.wait(10)


@pytest.mark.parametrize("who", ["destination not trusted", "our certificate not trusted"])
def test_move_to_a_tls_destination_failing_the_handshake_fails_every_instance(make_node, certs, who):
    if who == "destination not trusted":  # its certificate is from a CA we do not know
        dest = tls_destination(certs, certs.other_server, certs.other_server_key, certs.ca)
    else:  # it only takes clients of the other CA
        dest = tls_destination(certs, certs.server, certs.server_key, certs.other_ca)
    try:
        node = tls_node(make_node, certs, remote_aes={
            "DEST": {"host": "127.0.0.1", "port": dest.port, "tls": True}})
        study = make_study(series=1, per_series=3)
        assert [s.Status for s in send_datasets(node, study)] == [0] * 3
        _, final, ident = retrieve(node, identifier("STUDY", StudyInstanceUID=study[0].StudyInstanceUID),
                                   StudyRootMove, destination="DEST")
        assert final.Status == 0xA702 and counts(final) == (0, 3, 0)
        assert failed_uids(ident) == {str(ds.SOPInstanceUID) for ds in study}
        assert "DEST" in final.ErrorComment
        assert dest.received == {}
    finally:
        dest.stop()


def test_move_to_a_plain_destination_stays_plain(make_node, certs):
    dest = RecordingSCP()
    try:
        node = tls_node(make_node, certs, remote_aes={"DEST": {"host": "127.0.0.1", "port": dest.port}})
        study = make_study(series=1, per_series=2)
        assert [s.Status for s in send_datasets(node, study)] == [0] * 2
        _, final, _ = retrieve(node, identifier("STUDY", StudyInstanceUID=study[0].StudyInstanceUID),
                               StudyRootMove, destination="DEST")
        assert final.Status == 0 and counts(final) == (2, 0, 0)
    finally:
        dest.stop()


def test_commitment_report_to_a_tls_remote_goes_over_tls(make_node, certs):
    modality = Modality()
    try:
        modality.listen(certs.server_context(certs.server, certs.server_key, certs.ca))
        node = tls_node(make_node, certs, remote_aes={
            "MODALITY": {"host": "127.0.0.1", "port": modality.port, "tls": True}})
        study = make_study(series=1, per_series=2)
        assert [s.Status for s in send_datasets(node, study)] == [0] * 2
        refs = [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in study]
        assert modality.request(node, refs, keep_open=False)[0] == 0
        event_type, outcome, same = modality.report()
        assert event_type == 1 and outcome == {uid: None for _, uid in refs} and not same
    finally:
        modality.stop()


@pytest.mark.parametrize("tls, key, problem", [
    ({"certificate": "missing.crt"}, "tls.certificate", "cannot read"),
    ({"private_key": "."}, "tls.private_key", "cannot read"),
    ({"ca_certificates": "missing-ca.crt"}, "tls.ca_certificates", "cannot read"),
    ({"private_key": "OTHER_KEY"}, "tls.private_key", "not an unencrypted PEM private key matching"),
    ({"certificate": "SERVER_KEY"}, "tls.certificate", "is not a PEM certificate"),
    ({"ca_certificates": "SERVER_KEY"}, "tls.ca_certificates", "not a PEM file of CA certificates"),
    ({"private_key": None}, "tls.private_key", "missing"),
    ({"port": "PORT"}, "tls.port", "must differ from port"),
])
def test_bad_tls_config_is_one_line_and_exit_2(tmp_path, certs, tls, key, problem):
    port = free_port()
    substitutes = {"OTHER_KEY": str(certs.other_server_key), "SERVER_KEY": str(certs.server_key),
                   "PORT": port}
    section = certs.tls_config(port=free_port())
    section.update({name: substitutes.get(value, value) for name, value in tls.items()})
    path = write_config(tmp_path, port=port, tls={k: v for k, v in section.items() if v is not None})
    assert_config_error(run_pacs("stats", config=path), path, key, problem)


def test_serve_names_the_tls_port_it_cannot_listen_on(tmp_path, certs):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        path = write_config(tmp_path, tls=certs.tls_config(port=taken.getsockname()[1]))
        assert_config_error(run_pacs("serve", config=path, timeout=60), path, "tls.port",
                            "cannot listen")
