"""C-GET SCP: send the selected instances back over the requester's association (PS3.4 C.4.3).

The requester proposes storage contexts with SCP/SCU role selection (PS3.7
D.3.3.4); the node accepts the role (`build_ae`), and those contexts are the only
ones an instance can go out on. The C-STORE requests are written straight on
the association's socket by this thread, like the C-GET responses, and their
C-STORE responses are read by this thread too (`RequesterChannel`).
"""
from __future__ import annotations

import logging
import queue
import time

from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from pacs.archive import Archive
from pacs.pdata import (
    P_DATA, FileRegion, PDataWriter, command_fragments, parse_command, store_command,
)
from pacs.scu import ConnectionLost, Response
from pacs.services.retrieve import RequesterWriter, Responder, serve_retrieve
from pacs.transport import WakefulDUL

log = logging.getLogger(__name__)
_POLL_S = 0.2


class RequesterChannel:
    """C-STORE sub-operations on the C-GET requester's own association.

    While sub-operations run, this thread reads the requester's PDUs itself
    (`WakefulDUL.hold_reads`): a C-STORE-RSP is parsed here; anything else (a
    C-CANCEL, an A-ABORT, a closed connection) is put back for pynetdicom's DUL
    thread, which gets the socket back and queues the response as before.
    """

    def __init__(self, assoc: Association, writer: PDataWriter, first_msg_id: int):
        self._assoc = assoc
        self._writer = writer
        self._msg_id = first_msg_id
        self._dul = assoc.dul if isinstance(assoc.dul, WakefulDUL) else None
        self._holding = False
        self.accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])): cx.context_id
                         for cx in assoc.accepted_contexts if cx.as_scu}

    def store(self, context_id: int, sop_class: str, sop_uid: str,
              data: bytes | FileRegion) -> Response:
        self._msg_id = self._msg_id % 0xFFFF + 1
        if self._dul is not None and not self._holding:
            self._holding = self._dul.hold_reads()
        try:
            self._writer.send(context_id, store_command(self._msg_id, sop_class, sop_uid), data)
        except (OSError, EOFError) as exc:
            self.close()
            self._assoc.abort()  # a message cut in the middle cannot be resumed
            raise ConnectionLost(str(exc) or type(exc).__name__) from None
        return self._response(self._msg_id)

    def close(self) -> None:
        """Give the requester's PDUs back to pynetdicom's DUL thread."""
        if self._holding:
            self._holding = False
            self._dul.resume_reads()

    def _response(self, msg_id: int) -> Response:
        deadline = time.monotonic() + (self._assoc.dimse_timeout or float("inf"))
        while True:
            message = self._next(deadline)
            if message is None:
                if self._assoc.acse.is_aborted() or not self._assoc.dul.is_alive():
                    raise ConnectionLost("the requester aborted the association") from None
                if time.monotonic() > deadline:
                    self.close()
                    self._assoc.abort()
                    raise ConnectionLost("no C-STORE response within dimse_timeout") from None
                continue
            if isinstance(message, Response):
                return message
            if isinstance(message, C_STORE) and message.MessageIDBeingRespondedTo == msg_id:
                return Response(message.Status, str(message.ErrorComment or ""))
            log.warning("C-GET: ignored %s from %s during sub-operations",
                        type(message).__name__, self._assoc.requestor.ae_title)

    def _next(self, deadline: float) -> object | None:
        """Our C-STORE-RSP read off the socket, or what pynetdicom queued; None: nothing yet."""
        if self._holding:
            try:
                pdu = self._dul.read_held(min(_POLL_S, max(0.0, deadline - time.monotonic())))
            except (OSError, ValueError):  # the connection failed: the DUL thread sees it too
                pdu = b""
            if pdu is None:
                return None
            response = _store_response(pdu, self._msg_id)
            if response is not None:
                return response
            self._dul.socket.unread(pdu)
            self.close()
        try:
            return self._assoc.dimse.msg_queue.get(timeout=_POLL_S)[1]
        except queue.Empty:
            return None


def _store_response(pdu: bytes, msg_id: int) -> Response | None:
    """The status of a P-DATA-TF PDU that is exactly one C-STORE-RSP to `msg_id`, else None."""
    body = pdu[6:]
    if pdu[:1] != bytes([P_DATA]) or len(body) < 6 \
            or int.from_bytes(body[:4], "big") != len(body) - 4:
        return None  # not P-DATA, cut short, or more than one PDV
    fragments = command_fragments(body)
    if len(fragments) != 1 or not fragments[0][1]:
        return None
    return Response.to_store(parse_command(fragments[0][0]), msg_id)


def handle_get(event: Event, archive: Archive) -> None:
    """EVT_C_GET, called by `services.dispatch`: answers the request itself."""
    writer = RequesterWriter(event.assoc)
    responder = Responder(event, writer)
    if not responder.permitted():
        return
    channel = RequesterChannel(event.assoc, writer, event.request.MessageID)
    try:
        serve_retrieve(event, archive, responder,
                       lambda sender, matches: sender.send(channel, matches))
    finally:
        channel.close()
