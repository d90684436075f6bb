"""SIGTERM, SIGINT and SIGHUP delivered as bytes on a socket, for `pacs serve`.

The kernel hands a process's signal to any thread that does not block it,
often a pynetdicom thread, and Python then only flags it for the main thread,
which a blocking wait does not notice: a SIGTERM could go unheard until the
next one (seen under load). The wakeup fd is written by whichever thread
catches the signal, so a wait on it never misses one. The node waits on it
alone; the supervisor adds it to its selector.
"""
from __future__ import annotations

import signal
import socket


def signal_pipe() -> tuple[socket.socket, socket.socket]:
    """(reader, writer): the reader yields one byte, the signal number, per SIGTERM,
    SIGINT or SIGHUP; the writer must stay open as long as it is read."""
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda _signum, _frame: None)  # the wakeup fd does the work
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    return reader, writer
