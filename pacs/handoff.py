"""The worker side of :mod:`pacs.supervisor`: serve connections handed over a channel."""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading

from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from pacs.supervisor import CLOSED

log = logging.getLogger(__name__)


class ChannelServer(ThreadedAssociationServer):
    """A pynetdicom server that takes connections from the supervisor's channel.

    Instead of binding and accepting, it waits on the channel socket and
    receives already-accepted connections; pynetdicom handles them as usual.
    """

    channel: socket.socket

    def server_bind(self) -> None:
        self.socket.close()
        self.socket = self.channel

    def server_activate(self) -> None:
        """The supervisor listens; nothing to do here."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        _, fds, _, _ = socket.recv_fds(self.channel, 16, 1)
        if not fds:
            # The supervisor is gone: stop this worker gracefully, as on SIGTERM.
            log.error("supervisor channel closed; stopping worker %d", os.getpid())
            os.kill(os.getpid(), signal.SIGTERM)
            self.channel.close()
            raise OSError("supervisor channel closed")
        client = socket.socket(fileno=fds[0])
        client.setblocking(True)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True)
        return client, client.getpeername()

    def report_closed(self, _event: object = None) -> None:
        """EVT_CONN_CLOSE handler: tell the supervisor a slot is free."""
        try:
            self.channel.send(CLOSED)
        except OSError:
            pass


def start_channel_server(ae: AE, channel: socket.socket, handlers: list) -> ChannelServer:
    """Serve connections arriving on `channel` in a background thread."""
    # The address is never bound (server_bind is replaced); pynetdicom only wants one.
    server_class = type("BoundChannelServer", (ChannelServer,), {"channel": channel})
    server = ae.make_server(("127.0.0.1", 0), evt_handlers=handlers, server_class=server_class)
    server.bind(evt.EVT_CONN_CLOSE, server.report_closed)
    threading.Thread(target=server.serve_forever, name="channel-server", daemon=True).start()
    ae._servers.append(server)  # so server.shutdown() can deregister it, as start_server does
    return server
