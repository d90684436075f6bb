"""How connections reach pynetdicom: accepted on our own port, or handed over by the supervisor.

Both servers are pynetdicom's threaded server with the TLS handshake moved off
the accept loop (`pacs.tls.HandshakeInThread`); a TLS connection is wrapped
when accepted and its handshake done in its own thread, in the worker process.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import threading
from typing import TypeVar

from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from pacs.supervisor import CLOSED, HANDOFF_TLS
from pacs.tls import HandshakeInThread

log = logging.getLogger(__name__)
Server = TypeVar("Server", bound=ThreadedAssociationServer)


class ListeningServer(HandshakeInThread, ThreadedAssociationServer):
    """Listens on one port; with an `ssl_context` every connection is TLS."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()
        return (self.secure(client) if self.ssl_context else client), address


class ChannelServer(HandshakeInThread, ThreadedAssociationServer):
    """A pynetdicom server that takes connections from the supervisor's channel.

    Instead of binding and accepting, it waits on the channel socket and
    receives already-accepted connections, each tagged plain or TLS.
    """

    channel: socket.socket

    def server_bind(self) -> None:
        self.socket.close()
        self.socket = self.channel

    def server_activate(self) -> None:
        """The supervisor listens; nothing to do here."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # One byte per message: each tag stays with its own descriptor.
        tag, fds, _, _ = socket.recv_fds(self.channel, 1, 1)
        if not fds:
            # The supervisor is gone: stop this worker gracefully, as on SIGTERM.
            log.error("supervisor channel closed; stopping worker %d", os.getpid())
            os.kill(os.getpid(), signal.SIGTERM)
            self.channel.close()
            raise OSError("supervisor channel closed")
        client = socket.socket(fileno=fds[0])
        client.setblocking(True)
        if tag == HANDOFF_TLS:
            client = self.secure(client)
        return client, client.getpeername()

    def report_closed(self, _event: object = None) -> None:
        """EVT_CONN_CLOSE handler: tell the supervisor a slot is free."""
        try:
            self.channel.send(CLOSED)
        except OSError:
            pass

    def handshake_failed(self) -> None:
        """No association was opened, so no EVT_CONN_CLOSE comes: free the slot here."""
        self.report_closed()


def start_listening(ae: AE, address: tuple[str, int], handlers: list,
                    ssl_context: ssl.SSLContext | None = None) -> ListeningServer:
    """Listen on `address` (TLS with `ssl_context`) in a background thread."""
    server = ae.make_server(address, evt_handlers=handlers, server_class=ListeningServer,
                            ssl_context=ssl_context)
    return _run(ae, server)


def start_channel_server(ae: AE, channel: socket.socket, handlers: list,
                         ssl_context: ssl.SSLContext | None = None) -> ChannelServer:
    """Serve connections arriving on `channel` in a background thread."""
    # The address is never bound (server_bind is replaced); pynetdicom only wants one.
    server_class = type("BoundChannelServer", (ChannelServer,), {"channel": channel})
    server = ae.make_server(("127.0.0.1", 0), evt_handlers=handlers, server_class=server_class,
                            ssl_context=ssl_context)
    server.bind(evt.EVT_CONN_CLOSE, server.report_closed)
    return _run(ae, server)


def _run(ae: AE, server: Server) -> Server:
    threading.Thread(target=server.serve_forever, name=f"server-{server.server_address[1]}",
                     daemon=True).start()
    ae._servers.append(server)  # so server.shutdown() can deregister it, as start_server does
    return server
