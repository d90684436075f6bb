"""The DICOM node: a pynetdicom AE with our contexts, limits and handlers.

Knows nothing of SQL or the file layout: every service goes through the archive.
"""
from __future__ import annotations

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

from pacs.archive import Archive
from pacs.config import Config
from pacs.handoff import start_channel_server
from pacs.index.postgres import releasing
from pacs.services import dispatch
from pacs.services.commitment import handle_commitment
from pacs.services.echo import handle_echo
from pacs.services.find import FIND_CLASSES, handle_find
from pacs.services.get import handle_get
from pacs.services.move import handle_move
from pacs.services.retrieve import RETRIEVE_CLASSES
from pacs.services.store import (
    discard_partial, handle_store, open_receive_file, receive_into,
)
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


def build_ae(config: Config) -> AE:
    """An AE accepting Verification and every storage SOP class in any transfer syntax."""
    ae = AE(ae_title=config.ae_title)
    net = config.network
    ae.maximum_associations = net.max_associations
    ae.maximum_pdu_size = net.max_pdu
    ae.acse_timeout = net.acse_timeout
    ae.dimse_timeout = net.dimse_timeout
    ae.network_timeout = net.network_timeout
    ae.require_called_aet = config.security.require_called_ae
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
        self.ae = build_ae(config)
        self.server: ThreadedAssociationServer | None = None
        self._sweeper = threading.Event()

    @property
    def port(self) -> int:
        """The bound port (useful when the config asked for port 0)."""
        assert self.server is not None
        return self.server.server_address[1]

    def handlers(self) -> list[tuple]:
        return [
            (evt.EVT_CONN_OPEN, tune_connection),
            (evt.EVT_CONN_CLOSE, discard_partial),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, releasing(handle_store), [self.archive]),
            (evt.EVT_C_FIND, releasing(handle_find), [self.archive]),
            (evt.EVT_C_MOVE, releasing(handle_move), [self.archive, self.config]),
            (evt.EVT_C_GET, releasing(handle_get), [self.archive]),
            (evt.EVT_N_ACTION, releasing(handle_commitment), [self.archive, self.config]),
        ]

    def start(self, channel: socket.socket | None = None) -> None:
        """Listen on the configured port, or serve what a supervisor hands over `channel`."""
        receive_into(self.archive.store.staging)
        if channel is not None:
            # A worker: the supervisor listens, and cleaned staging before any worker started.
            self.server = start_channel_server(self.ae, channel, self.handlers())
            log.info("worker %d serving %s", os.getpid(), self.config.ae_title)
        else:
            clean_staging(self.archive)
            self.server = self.ae.start_server(
                (self.config.host, self.config.port), block=False, evt_handlers=self.handlers()
            )
            log.info("%s listening on %s:%d", self.config.ae_title, self.config.host, self.port)
        threading.Thread(target=self._sweep, name="staging-sweeper", daemon=True).start()

    def _sweep(self) -> None:
        """Drop receive files left by aborted associations, once they are surely dead."""
        age = _surely_dead_after(self.config)
        while not self._sweeper.wait(SWEEP_EVERY_S):
            self.archive.store.clean_staging(older_than=age)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Stop accepting, let running associations finish (bounded), then abort the rest."""
        self._sweeper.set()
        if self.server is None:
            return
        server, self.server = self.server, None
        server.shutdown()
        deadline = time.monotonic() + grace
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in server.active_associations:
            log.warning("aborting association with %s at shutdown", assoc.requestor.ae_title)
            assoc.abort()
        receive_into(None)


def _surely_dead_after(config: Config) -> float:
    """Seconds after which a receive file no association wrote to is abandoned."""
    net = config.network
    return 2 * (net.network_timeout + net.dimse_timeout) + 60


def clean_staging(archive: Archive) -> None:
    """Remove receive files of a previous run (only while no association can be running).

    With a PostgreSQL index other nodes may share the store and be receiving
    into its staging folder right now: then only abandoned files go.
    """
    shared = archive.config.database.url.startswith(("postgresql://", "postgres://"))
    removed = archive.store.clean_staging(
        older_than=_surely_dead_after(archive.config) if shared else 0)
    if removed:
        log.info("removed %d stray temporary files from an earlier run", removed)


def serve(config: Config, channel_fd: int | None = None) -> int:
    """Run the node in the foreground until SIGTERM or SIGINT; return the exit code.

    With `channel_fd` it is a worker of :mod:`pacs.supervisor` and takes its
    connections from that socket instead of listening itself.
    """
    archive = Archive(config)
    node = Node(config, archive)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    channel = socket.socket(fileno=channel_fd) if channel_fd is not None else None
    node.start(channel)
    while not stop.wait(1.0):
        pass
    log.info("stopping: no new associations, waiting up to %ds for running ones", STOP_GRACE_S)
    node.stop()
    archive.close()
    log.info("stopped")
    return 0
