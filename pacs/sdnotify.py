"""Tell systemd (Type=notify) when the node is ready, reloading or stopping.

The protocol is one datagram to the socket named in $NOTIFY_SOCKET (sd_notify(3));
without that variable (not started by systemd) nothing is sent. A few lines
instead of a dependency on python-systemd, which needs libsystemd to build.
"""
from __future__ import annotations

import os
import socket


def notify(state: str) -> None:
    """Send `state` (e.g. "READY=1") to systemd, if it is listening; never fails."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError:
        pass
