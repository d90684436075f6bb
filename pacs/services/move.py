"""C-MOVE SCP: push the selected instances to a configured AE (PS3.4 C.4.2).

The Move Destination must be in `remote_aes`, else 0xA801 with an ErrorComment
and no sub-operations. Each batch of at most 128 presentation contexts gets one
sub-association (`pacs.scu`), proposing exactly the SOP classes and transfer
syntaxes of its instances plus uncompressed fallbacks. A destination that cannot
be reached fails every instance of its batch, so the final response is 0xA702
naming them all, as dcmqrscp does (it fails all sub-operations). To a remote
marked `tls: true` the sub-association uses TLS (`pacs.tls.client_context`); a
failed handshake is an unreachable destination.
"""
from __future__ import annotations

import logging

from pynetdicom.events import Event

from pacs.archive import Archive
from pacs.config import Config, RemoteAE
from pacs.index.selection import Match
from pacs.live import LiveConfig
from pacs.scu import AssociationFailed, associate
from pacs.sender import Sender, plan
from pacs.services.retrieve import RequesterWriter, Responder, serve_retrieve
from pacs.statuses import MOVE_DESTINATION_UNKNOWN
from pacs.tls import client_context

log = logging.getLogger(__name__)


def handle_move(event: Event, archive: Archive, live: LiveConfig) -> None:
    """EVT_C_MOVE, called by `services.dispatch`: answers the request itself."""
    responder = Responder(event, RequesterWriter(event.assoc))
    if not responder.permitted():
        return
    config = live.current  # destinations as of now: remote_aes is reloaded on SIGHUP
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
    tls = client_context(config.tls) if remote.tls else None
    for proposals, batch in plan(matches):
        try:
            assoc = associate(remote.host, remote.port, config.ae_title, title, proposals,
                              acse_timeout=net.acse_timeout, dimse_timeout=net.dimse_timeout,
                              max_pdu=net.max_pdu, originator=originator, tls=tls)
        except AssociationFailed as exc:
            sender.fail(batch, str(exc))
            continue
        try:
            sender.send(assoc, batch)
        finally:
            assoc.release()
        if sender.cancelled:
            return
