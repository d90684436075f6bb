"""C-GET SCP: send the selected instances back over the requester's association (PS3.4 C.4.3).

The requester proposes storage contexts with SCP/SCU role selection (PS3.7
D.3.3.4); the node accepts the role (`build_ae`), and those contexts are the only
ones an instance can go out on. The C-STORE requests are written straight on
the association's socket by this thread, like the C-GET responses; pynetdicom's
DUL thread keeps reading it and queues each C-STORE response for us.
"""
from __future__ import annotations

import logging
import queue
import time

from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from pacs.archive import Archive
from pacs.pdata import FileRegion, PDataWriter, store_command
from pacs.scu import ConnectionLost, Response
from pacs.services.retrieve import RequesterWriter, Responder, serve_retrieve

log = logging.getLogger(__name__)
_POLL_S = 0.2


class RequesterChannel:
    """C-STORE sub-operations on the C-GET requester's own association."""

    def __init__(self, assoc: Association, writer: PDataWriter, first_msg_id: int):
        self._assoc = assoc
        self._writer = writer
        self._msg_id = first_msg_id
        self.accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])): cx.context_id
                         for cx in assoc.accepted_contexts if cx.as_scu}

    def store(self, context_id: int, sop_class: str, sop_uid: str,
              data: bytes | FileRegion) -> Response:
        self._msg_id = self._msg_id % 0xFFFF + 1
        try:
            self._writer.send(context_id, store_command(self._msg_id, sop_class, sop_uid), data)
        except (OSError, EOFError) as exc:
            self._assoc.abort()  # a message cut in the middle cannot be resumed
            raise ConnectionLost(str(exc) or type(exc).__name__) from None
        return self._response(self._msg_id)

    def _response(self, msg_id: int) -> Response:
        deadline = time.monotonic() + (self._assoc.dimse_timeout or float("inf"))
        while True:
            try:
                _, message = self._assoc.dimse.msg_queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._assoc.acse.is_aborted() or not self._assoc.dul.is_alive():
                    raise ConnectionLost("the requester aborted the association") from None
                if time.monotonic() > deadline:
                    self._assoc.abort()
                    raise ConnectionLost("no C-STORE response within dimse_timeout") from None
                continue
            if isinstance(message, C_STORE) and message.MessageIDBeingRespondedTo == msg_id:
                return Response(message.Status, str(message.ErrorComment or ""))
            log.warning("C-GET: ignored %s from %s during sub-operations",
                        type(message).__name__, self._assoc.requestor.ae_title)


def handle_get(event: Event, archive: Archive) -> None:
    """EVT_C_GET, called by `services.dispatch`: answers the request itself."""
    writer = RequesterWriter(event.assoc)
    responder = Responder(event, writer)
    if not responder.permitted():
        return
    channel = RequesterChannel(event.assoc, writer, event.request.MessageID)
    serve_retrieve(event, archive, responder, lambda sender, matches: sender.send(channel, matches))
