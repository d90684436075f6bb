"""The DICOM node: a pynetdicom AE with our contexts, limits and handlers.

Knows nothing of SQL or the file layout: every service goes through the archive.
"""
from __future__ import annotations

import logging
import signal
import socket
import tempfile
import threading
import time
from typing import Callable

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, _config, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification, _STORAGE_CLASSES
from pynetdicom.transport import ThreadedAssociationServer

from pacs.archive import Archive
from pacs.config import Config
from pacs.services.echo import handle_echo
from pacs.services.store import handle_store

log = logging.getLogger(__name__)
STOP_GRACE_S = 30
SWEEP_EVERY_S = 300

# Receive C-STORE data into a file rather than memory: flat RSS for any size,
# and the file becomes the stored file by rename (no copy, no decode).
_config.STORE_RECV_CHUNKED_DATASET = True


def set_nodelay(event: Event) -> None:
    """Turn Nagle off: request/response round trips otherwise stall ~40 ms (FIELD-NOTES)."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


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
    for uid in _STORAGE_CLASSES.values():
        ae.add_supported_context(uid, AllTransferSyntaxes)
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
            (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.archive]),
        ]

    def start(self) -> None:
        # pynetdicom names its receive files through `tempfile`: put them in the
        # store's staging folder so the final rename stays on one filesystem.
        tempfile.tempdir = str(self.archive.store.staging)
        removed = self.archive.store.clean_staging()
        if removed:
            log.info("removed %d stray temporary files from an earlier run", removed)
        self.server = self.ae.start_server(
            (self.config.host, self.config.port), block=False, evt_handlers=self.handlers()
        )
        threading.Thread(target=self._sweep, name="staging-sweeper", daemon=True).start()
        log.info("%s listening on %s:%d", self.config.ae_title, self.config.host, self.port)

    def _sweep(self) -> None:
        """Drop receive files left by aborted associations, once they are surely dead."""
        net = self.config.network
        age = 2 * (net.network_timeout + net.dimse_timeout) + 60
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


def serve(config: Config, ready: Callable[[Node], None] | None = None) -> int:
    """Run the node in the foreground until SIGTERM or SIGINT; return the exit code."""
    archive = Archive(config)
    node = Node(config, archive)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    node.start()
    if ready:
        ready(node)
    stop.wait()
    log.info("stopping: no new associations, waiting up to %ds for running ones", STOP_GRACE_S)
    node.stop()
    archive.close()
    log.info("stopped")
    return 0
