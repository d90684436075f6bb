"""C-MOVE SCP: push the selected instances to a configured AE (PS3.4 C.4.2).

The Move Destination must be in `remote_aes`, else 0xA801 with an ErrorComment
and no sub-operations. Each batch of at most 128 presentation contexts gets one
sub-association (`pacs.scu`), proposing exactly the SOP classes and transfer
syntaxes of its instances plus uncompressed fallbacks. A destination that cannot
be reached fails every instance of its batch, so the final response is 0xA702
naming them all, as dcmqrscp does (it fails all sub-operations).
"""
from __future__ import annotations

import logging

from pynetdicom.events import Event

from pacs.archive import Archive
from pacs.config import Config, RemoteAE
from pacs.index.selection import Match
from pacs.scu import AssociationFailed, associate
from pacs.sender import Sender, plan
from pacs.services.retrieve import Responder, requester_writer, serve_retrieve
from pacs.statuses import MOVE_DESTINATION_UNKNOWN

log = logging.getLogger(__name__)


def handle_move(event: Event, archive: Archive, config: Config) -> None:
    """EVT_C_MOVE, called by `services.dispatch`: answers the request itself."""
    responder = Responder(event, requester_writer(event.assoc))
    title = str(event.request.MoveDestination or "").strip()
    responder.op.destination = title
    remote = config.remote_aes.get(title)
    if remote is None:
        responder.fail(MOVE_DESTINATION_UNKNOWN,
                       f"Move Destination {title[:16]!r} is not in remote_aes")
        return
    originator = (event.assoc.requestor.ae_title, event.request.MessageID)

    def push(sender: Sender, matches: list[Match]) -> None:
        _push(sender, matches, config, title, remote, originator)

    serve_retrieve(event, archive, responder, push)


def _push(sender: Sender, matches: list[Match], config: Config, title: str, remote: RemoteAE,
          originator: tuple[str, int]) -> None:
    net = config.network
    for proposals, batch in plan(matches):
        if remote.tls:
            sender.fail(batch, f"TLS to {title} is not supported for C-MOVE yet")
            continue
        try:
            assoc = associate(remote.host, remote.port, config.ae_title, title, proposals,
                              acse_timeout=net.acse_timeout, dimse_timeout=net.dimse_timeout,
                              max_pdu=net.max_pdu, originator=originator)
        except AssociationFailed as exc:
            sender.fail(batch, str(exc))
            continue
        try:
            sender.send(assoc, batch)
        finally:
            assoc.release()
        if sender.cancelled:
            return
