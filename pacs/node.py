"""The DICOM node: a pynetdicom AE with our contexts, limits and handlers.

Knows nothing of SQL or the file layout: every service goes through the archive.
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import threading
import time

from pydicom.uid import AllTransferSyntaxes, ExplicitVRLittleEndian
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification, _STORAGE_CLASSES
from pynetdicom.transport import ThreadedAssociationServer

from pacs import access
from pacs import activity
from pacs.archive import Archive, abandoned_after
from pacs.config import Config
from pacs.endpoints import binding, endpoints
from pacs.handoff import start_channel_server, start_listening
from pacs.live import LiveConfig
from pacs.sdnotify import notify
from pacs.signals import signal_pipe
from pacs.index.postgres import releasing
from pacs.services import dispatch
from pacs.services.commitment import handle_commitment
from pacs.services.echo import handle_echo
from pacs.services.find import FIND_CLASSES, handle_find
from pacs.services.get import handle_get
from pacs.services.move import handle_move
from pacs.services.retrieve import RETRIEVE_CLASSES
from pacs.services.store import (
    discard_partial, handle_store, open_receive_file, receive_into, receive_store,
)
from pacs.tls import server_context
from pacs.transport import tune_connection

log = logging.getLogger(__name__)
# pynetdicom accepts the first of these the requester also proposed. Explicit VR
# Little Endian first (pydicom lists Implicit first), as DCMTK does: peers that
# offer both then need no conversion, and files come back by C-GET as stored.
STORAGE_SYNTAXES = [ExplicitVRLittleEndian] + [
    uid for uid in AllTransferSyntaxes if uid != ExplicitVRLittleEndian]
STOP_GRACE_S = 30
SWEEP_EVERY_S = 300

# Receive C-STORE data into a file rather than memory: flat RSS for any size,
# and the file becomes the stored file by rename (no copy, no decode). The
# file is ours (ReceiveFile): it lands in the store's staging folder, so the
# rename stays on one filesystem, and a disk error becomes a 0xA700 answer
# instead of an exception that kills pynetdicom's network thread.
_config.STORE_RECV_CHUNKED_DATASET = True
dimse_messages.NamedTemporaryFile = open_receive_file
# pynetdicom decodes and pretty-prints each C-FIND identifier for its INFO log
# even when nothing logs at INFO (~0.2 ms a query); the operation log
# (pacs.activity) says what was asked.
_config.LOG_REQUEST_IDENTIFIERS = False
# Its "standard" handlers describe every PDU and DIMSE message for its DEBUG log,
# which pacs never enables (logs.py): for an A-ASSOCIATE-RQ with a C-GET
# requester's ~120 role selections that walk is quadratic, ~10 ms an association.
_config.LOG_HANDLER_LEVEL = "none"


def build_ae(config: Config, live: LiveConfig | None = None) -> AE:
    """An AE accepting Verification and every storage SOP class in any transfer syntax.

    Associations and requests are checked against the access rules in force in
    `live` (`pacs.access`); without it, against `config`'s.
    """
    live = live or LiveConfig(config)
    ae = AE(ae_title=config.ae_title)
    net = config.network
    ae.maximum_associations = net.max_associations
    ae.maximum_pdu_size = net.max_pdu
    ae.acse_timeout = net.acse_timeout
    ae.dimse_timeout = net.dimse_timeout
    ae.network_timeout = net.network_timeout
    access.guard(ae, lambda: live.policy)  # also checks the called AE title
    ae.add_supported_context(Verification)
    # Compressed syntaxes are accepted and stored as received, never transcoded.
    # Both roles: a C-GET requester takes the SCP role for storage (PS3.7 D.3.3.4).
    for uid in _STORAGE_CLASSES.values():
        ae.add_supported_context(uid, STORAGE_SYNTAXES, scu_role=True, scp_role=True)
    for uid in FIND_CLASSES + RETRIEVE_CLASSES:
        ae.add_supported_context(uid)
    ae.add_supported_context(StorageCommitmentPushModel)
    dispatch.enable(ae)
    return ae


class Node:
    """Start and stop the listening server around one archive."""

    def __init__(self, config: Config, archive: Archive):
        self.config = config
        self.archive = archive
        self.live = LiveConfig(config)  # remote_aes and security, reloaded on SIGHUP
        self.ae = build_ae(config, self.live)
        self.servers: list[ThreadedAssociationServer] = []  # one per port, or the channel's
        self._sweeper = threading.Event()
        self._audit = activity.Flusher(self.ae, archive)  # running associations' audit rows

    @property
    def port(self) -> int:
        """The first bound port: the plain one, unless `tls.plain_port` is false."""
        return self.servers[0].server_address[1]

    def handlers(self) -> list[tuple]:
        return [
            (evt.EVT_CONN_OPEN, tune_connection,
             [releasing(functools.partial(receive_store, self.archive))]),
            (evt.EVT_CONN_OPEN, activity.on_open),
            (evt.EVT_RELEASED, activity.on_end),
            (evt.EVT_ABORTED, activity.on_end),
            (evt.EVT_REJECTED, activity.on_end),
            (evt.EVT_CONN_CLOSE, discard_partial),
            (evt.EVT_CONN_CLOSE, releasing(activity.on_close), [self.archive]),  # writes audit rows
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, releasing(handle_store), [self.archive]),
            (evt.EVT_C_FIND, releasing(handle_find), [self.archive]),
            (evt.EVT_C_MOVE, releasing(handle_move), [self.archive, self.live]),
            (evt.EVT_C_GET, releasing(handle_get), [self.archive]),
            (evt.EVT_N_ACTION, releasing(handle_commitment), [self.archive, self.live]),
        ]

    def start(self, channel: socket.socket | None = None) -> None:
        """Listen on the configured ports, or serve what a supervisor hands over `channel`."""
        receive_into(self.archive.store.staging, self.archive.check_space)
        tls = server_context(self.config.tls) if self.config.tls is not None else None
        if channel is not None:
            # A worker: the supervisor listens, and cleaned staging before any worker started.
            self.servers = [start_channel_server(self.ae, channel, self.handlers(), tls)]
            log.info("worker %d serving %s", os.getpid(), self.config.ae_title)
        else:
            self.archive.clean_staging()
            for endpoint in endpoints(self.config):
                with binding(endpoint, self.config.host):
                    server = start_listening(self.ae, (self.config.host, endpoint.port),
                                             self.handlers(), tls if endpoint.tls else None)
                self.servers.append(server)
            for server in self.servers:
                log.info("%s listening on %s:%d%s", self.config.ae_title, self.config.host,
                         server.server_address[1], " (TLS)" if server.ssl_context else "")
        threading.Thread(target=self._sweep, name="staging-sweeper", daemon=True).start()
        self._audit.start()

    def _sweep(self) -> None:
        """Drop receive files left by aborted associations, once they are surely dead."""
        age = abandoned_after(self.config)
        while not self._sweeper.wait(SWEEP_EVERY_S):
            self.archive.store.clean_staging(older_than=age)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Stop accepting, let running associations finish (bounded), then abort the rest."""
        self._sweeper.set()
        if not self.servers:
            return
        servers, self.servers = self.servers, []
        for server in servers:
            server.shutdown()
        deadline = time.monotonic() + grace
        while any(s.active_associations for s in servers) and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in [a for s in servers for a in s.active_associations]:
            log.warning("aborting association with %s at shutdown", assoc.requestor.ae_title)
            assoc.abort()
        self._audit.stop()
        receive_into(None)


def serve(config: Config, channel_fd: int | None = None) -> int:
    """Run the node in the foreground until SIGTERM or SIGINT; return the exit code.

    SIGHUP reloads `remote_aes` and `security` (`pacs.live`). With `channel_fd`
    it is a worker of :mod:`pacs.supervisor` and takes its connections from that
    socket instead of listening itself.
    """
    archive = Archive(config)
    node = Node(config, archive)
    signals, _writer = signal_pipe()
    # A supervisor starts its workers with SIGHUP blocked, so that a reload
    # cannot kill one before the handler is in place; a held one arrives now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    channel = socket.socket(fileno=channel_fd) if channel_fd is not None else None
    node.start(channel)
    notify("READY=1")  # workers have no $NOTIFY_SOCKET: the supervisor tells systemd
    while signals.recv(1)[0] == signal.SIGHUP:
        notify("RELOADING=1")
        node.live.reload()
        notify("READY=1")
    notify("STOPPING=1")
    log.info("stopping: no new associations, waiting up to %ds for running ones", STOP_GRACE_S)
    node.stop()
    archive.close()
    log.info("stopped")
    return 0
