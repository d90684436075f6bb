"""A blocking Storage SCU association: the C-MOVE sub-association (PS3.8 7.1-7.3).

One thread negotiates, streams C-STORE requests through `pdata.PDataWriter` and
blocks on `recv` for each response, with no helper threads or polling, so a
round trip costs what the network costs. pynetdicom's PDU classes encode the
A-ASSOCIATE-RQ and decode the answer.
"""
from __future__ import annotations

import logging
import socket
import ssl
import struct
from dataclasses import dataclass
from typing import Iterable

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from pacs.pdata import (
    C_STORE_RSP, P_DATA, Command, FileRegion, PDataWriter, command_fragments, parse_command, read_pdu,
    store_command,
)

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
MAX_CONTEXTS = 128  # context IDs are the odd numbers 1-255 (PS3.8 9.3.2.2)
_ASSOCIATE_AC, _ASSOCIATE_RJ, _RELEASE_RQ, _RELEASE_RP, _ABORT = 0x02, 0x03, 0x05, 0x06, 0x07
_RELEASE_RQ_PDU = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
_RELEASE_RP_PDU = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"


class AssociationFailed(Exception):
    """No association: connection refused, rejection, timeout or a protocol error."""


class ConnectionLost(Exception):
    """The peer aborted, closed the connection or stopped answering mid-operation."""


@dataclass(frozen=True)
class Proposal:
    """One presentation context to propose: a SOP class and its transfer syntaxes."""

    sop_class: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class Response:
    status: int
    comment: str = ""

    @classmethod
    def to_store(cls, command: Command, msg_id: int) -> Response | None:
        """The status of `command` if it is a C-STORE-RSP to request `msg_id`, else None."""
        status = command.us(0x0900)
        if command.us(0x0100) != C_STORE_RSP or command.us(0x0120) != msg_id or status is None:
            return None
        return cls(status, command.text(0x0902))


class StoreAssociation:
    """An established association on which this side is the Storage SCU."""

    def __init__(self, sock: socket.socket, peer_max_pdu: int,
                 accepted: dict[tuple[str, str], int], originator: tuple[str, int] | None):
        self._sock = sock
        self._writer = PDataWriter(sock, peer_max_pdu)
        self._originator = originator
        self._msg_id = 0
        self.accepted = accepted  # (SOP class, transfer syntax) -> presentation context ID
        self.open = True

    def store(self, context_id: int, sop_class: str, sop_uid: str,
              data: bytes | FileRegion) -> Response:
        """Send one C-STORE-RQ with its data set.

        Raises ConnectionLost; the association is then closed.
        """
        self._msg_id = self._msg_id % 0xFFFF + 1
        msg_id = self._msg_id
        command = store_command(msg_id, sop_class, sop_uid, self._originator)
        try:
            self._writer.send(context_id, command, data)
            answer = self._read_command()
        except (OSError, EOFError) as exc:
            self.abort()
            raise ConnectionLost(str(exc) or type(exc).__name__) from None
        response = Response.to_store(answer, msg_id)
        if response is None:
            self.abort()
            raise ConnectionLost("the answer is not a C-STORE-RSP to our request")
        return response

    def _read_command(self) -> Command:
        fragments = []
        while True:
            kind, body = read_pdu(self._sock)
            if kind == _ABORT:
                self.open = False
                raise EOFError("the destination aborted the association")
            if kind != P_DATA:
                raise EOFError(f"unexpected PDU type 0x{kind:02X} during an operation")
            for fragment, last in command_fragments(body):
                fragments.append(fragment)
                if last:
                    return parse_command(b"".join(fragments))

    def release(self) -> None:
        """A-RELEASE (PS3.8 7.2); just close if the peer does not answer properly."""
        if not self.open:
            return
        try:
            self._sock.sendall(_RELEASE_RQ_PDU)
            while True:
                kind, _ = read_pdu(self._sock)
                if kind == _RELEASE_RQ:  # release collision (PS3.8 7.2.2)
                    self._sock.sendall(_RELEASE_RP_PDU)
                if kind in (_RELEASE_RQ, _RELEASE_RP, _ABORT):
                    break
        except (OSError, EOFError) as exc:
            log.debug("release failed (%s); closing", exc)
        self._close()

    def abort(self) -> None:
        if self.open:
            pdu = A_ABORT_RQ()
            pdu.source, pdu.reason_diagnostic = 0x00, 0x00
            try:
                self._sock.sendall(pdu.encode())
            except OSError:
                pass
        self._close()

    def _close(self) -> None:
        self.open = False
        self._sock.close()


def _request(calling: str, called: str, proposals: list[Proposal], max_pdu: int) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    contexts = []
    for index, proposal in enumerate(proposals):
        context = PresentationContext()
        context.context_id = 2 * index + 1
        context.abstract_syntax = proposal.sop_class
        context.transfer_syntax = list(proposal.transfer_syntaxes)
        contexts.append(context)
    primitive.presentation_context_definition_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
    primitive.user_information = [length, implementation, version]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def _negotiate(sock: socket.socket, where: str, request: bytes) -> A_ASSOCIATE:
    sock.sendall(request)
    kind, body = read_pdu(sock)
    whole = struct.pack(">BBI", kind, 0, len(body)) + body
    if kind == _ASSOCIATE_RJ:
        reject = A_ASSOCIATE_RJ()
        reject.decode(whole)
        raise AssociationFailed(f"{where} rejected the association (result {reject.result}, "
                                f"source {reject.source}, reason {reject.reason_diagnostic})")
    if kind != _ASSOCIATE_AC:
        raise AssociationFailed(f"{where} answered the association request with PDU type {kind}")
    accept = A_ASSOCIATE_AC()
    accept.decode(whole)
    return accept.to_primitive()


def _secure(sock: socket.socket, tls: ssl.SSLContext, host: str, where: str) -> ssl.SSLSocket:
    """The client side of the TLS handshake (within the connect timeout)."""
    try:
        return tls.wrap_socket(sock, server_hostname=host)
    except (OSError, ValueError) as exc:
        raise AssociationFailed(f"TLS handshake with {where} failed: {exc}") from None


def associate(host: str, port: int, calling: str, called: str, proposals: Iterable[Proposal],
              *, acse_timeout: float, dimse_timeout: float, max_pdu: int = 0,
              originator: tuple[str, int] | None = None,
              tls: ssl.SSLContext | None = None) -> StoreAssociation:
    """Connect (TCP_NODELAY, TLS with `tls`) and negotiate an association for C-STORE requests.

    `originator` is the C-MOVE requester's (AE title, Message ID), put in every
    request (PS3.7 9.1.1.1). Raises AssociationFailed.
    """
    proposals = list(proposals)
    if not 0 < len(proposals) <= MAX_CONTEXTS:
        raise ValueError(f"{len(proposals)} presentation contexts (1-{MAX_CONTEXTS} allowed)")
    where = f"{called} at {host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=acse_timeout)
    except OSError as exc:
        raise AssociationFailed(f"cannot connect to {where}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = _secure(sock, tls, host, where)
        answer = _negotiate(sock, where, _request(calling, called, proposals, max_pdu))
    except AssociationFailed:
        sock.close()
        raise
    except (OSError, EOFError, ValueError, struct.error) as exc:
        sock.close()
        raise AssociationFailed(f"association with {where} failed: {exc}") from None
    accepted = {}
    for result in answer.presentation_context_definition_results_list:
        index = (result.context_id - 1) // 2
        if result.result == 0 and result.transfer_syntax and 0 <= index < len(proposals):
            accepted[(proposals[index].sop_class, str(result.transfer_syntax[0]))] = result.context_id
    peer_max = next((item.maximum_length_received for item in answer.user_information
                     if isinstance(item, MaximumLengthNotification)), 0)
    sock.settimeout(dimse_timeout)
    return StoreAssociation(sock, peer_max or 0, accepted, originator)
