"""Raw bytes on a TCP connection to the node: real PDUs to mutate, and reading until close.

The A-ASSOCIATE-RQ is captured from a real pynetdicom requestor rather than
built by hand, so the mutations start from what a real peer sends.
"""
from __future__ import annotations

import functools
import socket
import struct
import threading
import time
from io import BytesIO

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_messages import C_ECHO_RQ
from pynetdicom.dsutils import decode, encode
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage, Verification

RELEASE_RQ = bytes.fromhex("05000000000400000000")
ABORT = bytes.fromhex("07000000000400000000")
ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA = 0x02, 0x03, 0x04


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """One PDU (type, body); EOFError when the connection closes first."""
    header = _read_exactly(sock, 6)
    kind, _, length = struct.unpack(">BBI", header)
    return kind, _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(min(count - len(data), 1 << 16))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {count} bytes")
        data += chunk
    return bytes(data)


@functools.cache
def associate_rq(called: str = "MINIPACS") -> bytes:
    """The A-ASSOCIATE-RQ pynetdicom sends proposing Verification (context 1) and CT (context 3)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        ae = AE(ae_title="RAWSCU")
        ae.add_requested_context(Verification)
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        ae.acse_timeout = 5
        requestor = threading.Thread(target=ae.associate, args=("127.0.0.1", port),
                                     kwargs={"ae_title": called}, daemon=True)
        requestor.start()
        conn, _ = listener.accept()
        with conn:
            kind, body = read_pdu(conn)
        requestor.join(10)
    assert kind == 0x01
    return struct.pack(">BBI", kind, 0, len(body)) + body


@functools.cache
def echo_pdata(context_id: int = 1) -> bytes:
    """A C-ECHO-RQ as the P-DATA-TF PDUs a requestor sends on `context_id`."""
    request = C_ECHO()
    request.MessageID = 1
    request.AffectedSOPClassUID = Verification
    message = C_ECHO_RQ()
    message.primitive_to_message(request)
    encoded = []
    for primitive in message.encode_msg(context_id, 16384):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        encoded.append(pdu.encode())
    return b"".join(encoded)


def connect(port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def establish(port: int, timeout: float, slot_wait: float = 10) -> socket.socket:
    """A raw connection with an accepted association (contexts 1: Verification, 3: CT).

    A rejection is tried again for up to `slot_wait` seconds: an association
    released a moment ago (the readiness C-ECHO) holds its slot until the
    node's thread for it has ended.
    """
    deadline = time.monotonic() + slot_wait
    while True:
        sock = connect(port, timeout)
        sock.sendall(associate_rq())
        kind, _ = read_pdu(sock)
        if kind == ASSOCIATE_AC:
            return sock
        sock.close()
        assert kind == ASSOCIATE_RJ and time.monotonic() < deadline, \
            f"association not accepted (PDU type {kind:#04x})"
        time.sleep(0.1)


def answers_until_close(sock: socket.socket) -> list[int]:
    """The types of the PDUs the node sends until it closes the connection.

    Raises TimeoutError if the node neither sends nor closes within the
    socket's timeout: it would be holding the connection open for good.
    """
    kinds = []
    while True:
        try:
            kind, _ = read_pdu(sock)
        except (EOFError, ConnectionResetError):
            return kinds
        kinds.append(kind)


def pdata(context_id: int, flags: int, fragment: bytes) -> bytes:
    """One P-DATA-TF PDU with one PDV (flags: bit 0 command, bit 1 last fragment)."""
    return struct.pack(">BBIIBB", P_DATA, 0, len(fragment) + 6, len(fragment) + 2,
                       context_id, flags) + fragment


def command_set(elements: Dataset) -> bytes:
    """A command set in Implicit VR Little Endian with its group length first (PS3.7 6.3.1)."""
    body = encode(elements, True, True)
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def store_request(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set carrying whatever UIDs it is given, valid or not."""
    command = Dataset()
    command.AffectedSOPClassUID = sop_class
    command.CommandField = 0x0001
    command.MessageID = message_id
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = sop_instance
    return command_set(command)


def read_response(sock: socket.socket) -> Dataset | int:
    """The next DIMSE command set the node sends, or the type of a non-P-DATA PDU it sends."""
    fragments = []
    while True:
        kind, body = read_pdu(sock)
        if kind != P_DATA:
            return kind
        offset = 0
        while offset < len(body):
            length, _, flags = struct.unpack(">IBB", body[offset:offset + 6])
            fragments.append(body[offset + 6:offset + 4 + length])
            offset += 4 + length
            if flags & 0x03 == 0x03:
                return decode(BytesIO(b"".join(fragments)), True, True)


def store_pdus(sop_class: str, affected: str, data: bytes, message_id: int = 1) -> list[bytes]:
    """A C-STORE-RQ on context 3 as P-DATA-TF PDUs: the command, then the data in 16000-byte
    fragments (a test may hold some back to keep the store in flight)."""
    fragments = [data[i:i + 16000] for i in range(0, len(data), 16000)] or [b""]
    return [pdata(3, 0x03, store_request(sop_class, affected, message_id))] + [
        pdata(3, 0x02 if i == len(fragments) - 1 else 0x00, f) for i, f in enumerate(fragments)]


def send_store(port: int, sop_class: str, affected: str, data: bytes) -> Dataset | int | str:
    """One C-STORE on a fresh raw association: the response command set, or a PDU type."""
    with establish(port, timeout=60) as sock:
        sock.sendall(b"".join(store_pdus(sop_class, affected, data)))
        try:
            return read_response(sock)
        except (EOFError, ConnectionResetError):
            return "closed"
