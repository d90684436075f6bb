"""Per-connection tuning of pynetdicom's transport for request/response latency.

pynetdicom 3.0 polls: its DUL thread sleeps `_run_loop_delay` (1 ms) whenever
a loop found nothing to do, and it never sets TCP_NODELAY. Both add latency to
every DIMSE round trip (FIELD-NOTES: Nagle + delayed ACK stall ~40 ms; the 1 ms
poll costs ~1.4 ms per C-STORE measured with a no-op handler). We turn Nagle
off, poll fast only while the peer is active (idle associations still cost
next to no CPU), and read each PDU with as few recv calls as possible.
Relies on pynetdicom 3.0 internals (pinned in pyproject).
"""
from __future__ import annotations

import socket
import time
import weakref

from pydicom.uid import UID
from pynetdicom.dul import DULServiceProvider
from pynetdicom.events import Event
from pynetdicom.transport import AssociationSocket

ACTIVE_POLL_S = 0.0001  # poll delay right after traffic
IDLE_POLL_S = 0.001      # pynetdicom's default, once the peer has been quiet
ACTIVE_WINDOW_S = 0.05   # how long after the last received PDU we stay fast
FIRST_READ = 1 << 20     # buffer for one PDU before it has proven to be longer
WAIT_STEP_S = 0.05       # how often a waiting association looks whether its connection ended


# pynetdicom deep-copies every supported presentation context for each new
# association (~35 ms of CPU with ~170 storage classes x 40 syntaxes), mostly in
# copying UID strings. A UID is an immutable str: its deep copy can be itself.
UID.__deepcopy__ = lambda self, memo: self  # type: ignore[attr-defined]

_running: weakref.WeakSet = weakref.WeakSet()


class ResponsiveDUL(DULServiceProvider):
    """A DUL whose poll delay is short while PDUs keep arriving on a lone association.

    With several associations in the process the CPU is the limit, not the
    latency, and fast polling would only steal it from the others.
    """

    @property  # type: ignore[override]
    def _run_loop_delay(self) -> float:
        last = self._idle_timer._start_time  # restarted on every received PDU
        if last is not None and time.time() - last < ACTIVE_WINDOW_S:
            if sum(1 for dul in list(_running) if dul.is_alive()) <= 1:
                return ACTIVE_POLL_S
        return IDLE_POLL_S

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:
        """pynetdicom's constructor sets a fixed delay; ours is computed."""

    def receive_pdu(self, wait: bool = False, timeout: float | None = None):  # type: ignore[override]
        """pynetdicom's, but a wait ends as soon as the connection has ended.

        An acceptor waits up to acse_timeout for the A-ASSOCIATE-RQ even when
        the peer closed the connection without sending one, holding a
        max_associations slot all that time: junk connections could keep the
        node full.
        """
        if not wait:
            return super().receive_pdu(wait=False)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = WAIT_STEP_S if deadline is None else deadline - time.monotonic()
            primitive = super().receive_pdu(wait=True, timeout=max(0.0, min(WAIT_STEP_S, left)))
            if primitive is not None or left <= WAIT_STEP_S:
                return primitive
            if getattr(self.socket, "ended", False):  # one last look: queued before the end?
                return super().receive_pdu(wait=False)


class BulkSocket(AssociationSocket):
    """Reads a PDU in as few recv calls as the kernel allows (pynetdicom: 4 KiB each).

    The buffer grows with the data that actually arrives, never to the length
    a PDU header merely claims (a forged 4 GiB length would cost 4 GiB of RAM),
    and a read that waits longer than the socket timeout returns what it has:
    pynetdicom then sees a short PDU and closes the connection, so a peer that
    stops mid-PDU does not hold its association slot forever.
    """

    ended = False  # the peer closed the connection, or stalled mid-PDU

    def recv(self, nr_bytes: int) -> bytearray:
        buffer = bytearray(min(nr_bytes, FIRST_READ))
        received = 0
        while received < nr_bytes:
            if received == len(buffer):  # double it, never past the PDU's length
                buffer.extend(bytes(min(len(buffer), nr_bytes - received)))
            try:
                with memoryview(buffer) as view:
                    count = self.socket.recv_into(view[received:])
            except TimeoutError:
                count = 0
            if not count:  # closed or stalled: return what arrived, as pynetdicom does
                self.ended = True
                del buffer[received:]
                return buffer
            received += count
        return buffer


def tune_connection(event: Event) -> None:
    """EVT_CONN_OPEN handler: Nagle off, reads bounded by the network timeout, the responsive poll.

    pynetdicom checks its network timeout only between PDUs and reads a PDU
    with blocking calls on a socket without a timeout, so without one here a
    peer that stops mid-PDU would block its association thread for good.
    """
    assoc = event.assoc
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(assoc.network_timeout)
        except OSError:
            pass
    if type(assoc.dul) is DULServiceProvider:
        assoc.dul.__class__ = ResponsiveDUL
        _running.add(assoc.dul)
    if type(assoc.dul.socket) is AssociationSocket:
        assoc.dul.socket.__class__ = BulkSocket
