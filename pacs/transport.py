"""Per-connection tuning of pynetdicom's transport: no polling, no Nagle.

pynetdicom 3.0 polls. For each association its DUL thread sleeps 1 ms
whenever a loop found nothing to do, and the association thread sleeps 1 ms
between looks at its message queue; neither sets TCP_NODELAY. So every DIMSE
round trip waits on the polls (FIELD-NOTES: Nagle + delayed ACK stall ~40 ms
more), and each open association burns ~2,000 wake-ups a second: with four
storing associations, py-spy put ~45% of the server's samples in the two
reactor loops. Here both threads sleep until there is work instead: the DUL
thread in select() on its socket plus a wake-up socket that is written when
the association thread queues a PDU to send, and the association thread on an
Event set when a DIMSE message or an ACSE primitive arrives. Both still look
around every WAKE_CHECK_S for pynetdicom's timers (ARTIM, network timeout).
Relies on pynetdicom 3.0 internals (pinned in pyproject).
"""
from __future__ import annotations

import functools
import logging
import queue
import select
import socket
import ssl
import threading
import time
import weakref
from typing import Any, Callable

import pynetdicom.pdu_items
import pynetdicom.pdu_primitives
import pynetdicom.presentation
import pynetdicom.utils
from pydicom.uid import UID
from pynetdicom import dul as dul_module
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.events import Event
from pynetdicom.transport import AssociationSocket
from pynetdicom.utils import make_target

from pacs.pdata import P_DATA as P_DATA_TYPE
from pacs.receiver import FramingError, StoreHandler, StoreReceiver

LOGGER = logging.getLogger(__name__)
WAKE_CHECK_S = 0.05  # timers are looked at least this often (ARTIM, idle: seconds)
FALLBACK_SLEEP_S = 0.001  # pynetdicom's poll, where there is no socket to wait on
FIRST_READ = 1 << 20  # buffer for one PDU before it has proven to be longer
WAIT_STEP_S = 0.05  # how often a waiting association looks whether its connection ended


class _Clock:
    """pynetdicom.dul's `time`, minus the zero-second sleeps of WakefulDUL's loop.

    Its reactor sleeps `_run_loop_delay` when idle; ours waits in that property
    and then answers 0, and time.sleep(0) is still a system call and a GIL
    hand-off (two per PDU), paid by every other thread of the process.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


dul_module.time = _Clock()  # type: ignore[assignment]


# pynetdicom deep-copies every supported presentation context for each new
# association (~35 ms of CPU with ~170 storage classes x 40 syntaxes), mostly in
# copying UID strings. A UID is an immutable str: its deep copy can be itself.
# And a context's other fields are immutable too, except its list of transfer
# syntaxes: copy.deepcopy's generic walk over them still took ~6 ms.
UID.__deepcopy__ = lambda self, memo: self  # type: ignore[attr-defined]


def _copy_context(context: PresentationContext, memo: dict) -> PresentationContext:
    clone = object.__new__(PresentationContext)
    clone.__dict__.update(context.__dict__)
    clone._transfer_syntax = list(context._transfer_syntax)
    return clone


PresentationContext.__deepcopy__ = _copy_context  # type: ignore[attr-defined]

# Decoding an A-ASSOCIATE-RQ checks each UID in it with three regular expressions
# (pydicom's UID(), pynetdicom's validator, UID.is_valid): a C-GET requester's
# ~120 contexts with role selections cost ~9 ms of it. The same few hundred UIDs
# come back on every association, and a UID is immutable: remember the checked ones.
# pynetdicom passes set_uid only str, bytes, UID or None, all hashable; the cache
# is C code, so a malformed UID's traceback stays pynetdicom's alone. (A private
# transfer syntax's UID may come back without its encoding: pacs sets none.)
_set_uid = functools.lru_cache(maxsize=4096, typed=True)(pynetdicom.utils.set_uid)
for _module in (pynetdicom.utils, pynetdicom.pdu_items, pynetdicom.pdu_primitives,
                pynetdicom.presentation):
    _module.set_uid = _set_uid  # type: ignore[attr-defined]


class SignallingQueue(queue.Queue):
    """A queue that calls `signal` after each put, so its reader can block elsewhere.

    Installed by changing the class of pynetdicom's existing queues, which
    keeps any item already in them.
    """

    signal: Callable[[], None]

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.signal()


class WakefulDUL(DULServiceProvider):
    """A DUL thread that waits in select() for the peer or for a PDU to send."""

    _waker: socket.socket  # written by other threads
    _wakee: socket.socket  # read in select() by the DUL thread
    _waiting = False  # in select(): only then is a wake-up worth a syscall
    _held = False  # another thread reads the peer's PDUs for now (hold_reads)
    receiver: StoreReceiver | None = None  # takes C-STORE requests off pynetdicom's path

    def install(self) -> None:
        """Set up the wake-up pair; called before the thread starts."""
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()  # held by this thread while it reads a PDU
        self._wakee, self._waker = socket.socketpair()
        self._waker.setblocking(False)
        self._wakee.setblocking(False)
        weakref.finalize(self, _close_pair, self._wakee, self._waker)
        self.to_provider_queue.__class__ = SignallingQueue
        self.to_provider_queue.signal = self.wake
        # The thread's target is the base class's reactor, bound when it was made.
        self._target = make_target(self.run_reactor)  # type: ignore[attr-defined]

    def send_pdu(self, primitive: Any) -> None:
        """Send P-DATA on the calling thread while the association is established.

        pynetdicom queues every PDU for the DUL thread to send: a wake-up and a
        GIL hand-off per DIMSE response, which with several storing
        associations in one process cost more than the response itself.
        """
        if type(primitive) is P_DATA and self.state_machine.current_state == "Sta6":
            self._send(P_DATA_TF(primitive))
            return
        super().send_pdu(primitive)

    def _send(self, pdu: Any) -> None:
        with self._send_lock:  # the DUL thread sends too (release, abort)
            super()._send(pdu)

    def hold_reads(self) -> bool:
        """Stop reading the peer once any PDU being read is complete; True if the caller
        may now read PDUs itself with `read_held` (False: TLS, which stays with this thread).

        For a C-GET's C-STORE responses: read by the handler, each skips this
        thread's wake-up, its reactor loop and a queue hand-off (~0.1 ms an instance).
        """
        sock = self.socket
        if not isinstance(sock, BulkSocket) or isinstance(sock.socket, ssl.SSLSocket):
            return False
        with self._read_lock:
            self._held = True
        return True

    def resume_reads(self) -> None:
        """Give the peer's PDUs back to this thread (whatever was put back comes first)."""
        if self._held:
            self._held = False
            self.nudge()

    def read_held(self, timeout: float) -> bytes | None:
        """The next PDU while reads are held; None if none began within `timeout`.

        A PDU cut short (connection closed, stalled) comes back short, b"" at the
        end of the connection: put back (`socket.unread`), this thread sees the end.
        """
        sock = self.socket
        if not sock._unread and not select.select([sock.socket], [], [], timeout)[0]:
            return None
        head = sock.recv(6)
        if len(head) < 6:
            return bytes(head)
        return bytes(head + sock.recv(int.from_bytes(head[2:6], "big")))

    def _is_transport_event(self) -> bool:
        with self._read_lock:
            return not self._held and super()._is_transport_event()

    def wake(self) -> None:
        if self._waiting or self._kill_thread:
            self.nudge()

    def nudge(self) -> None:
        try:
            self._waker.send(b"\0")
        except OSError:  # full: a wake-up is pending anyway; closed: the thread is gone
            pass

    @property  # type: ignore[override]
    def _run_loop_delay(self) -> float:
        """Where pynetdicom sleeps between polls, wait for work; then sleep 0.

        Other threads read this too (stop_dul waits with it): they get a plain delay.
        """
        if threading.current_thread() is self:
            self._wait_for_work()
            return 0.0
        return FALLBACK_SLEEP_S

    @_run_loop_delay.setter
    def _run_loop_delay(self, value: float) -> None:
        """pynetdicom's constructor sets a fixed delay; ours is computed."""

    def _wait_for_work(self) -> None:
        peer = getattr(self.socket, "socket", None)
        if peer is None or self._kill_thread:
            time.sleep(FALLBACK_SLEEP_S)
            return
        if isinstance(peer, ssl.SSLSocket) and peer.pending():
            return  # decrypted bytes wait in the SSL buffer, invisible to select()
        self._waiting = True
        try:
            # a PDU queued before the flag was up found no one to wake: look again
            if self.to_provider_queue.empty():
                watched = [self._wakee] if self._held else [peer, self._wakee]
                ready, _, _ = select.select(watched, [], [], WAKE_CHECK_S)
                if self._wakee in ready:
                    self._wakee.recv(4096)
                if peer in ready and isinstance(self.socket, BulkSocket):
                    self.socket.readable = True  # spares pynetdicom's select() to ask again
        except (OSError, ValueError):  # closed under us: pynetdicom's loop notices
            time.sleep(FALLBACK_SLEEP_S)
        finally:
            self._waiting = False

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

    def _read_pdu_data(self) -> None:
        """Offer each P-DATA-TF PDU of the established association to our C-STORE receiver.

        What it does not take, and every other PDU, goes to pynetdicom's reader as
        if never looked at: the bytes read are put back in front of the socket.
        """
        receiver = self.receiver
        if receiver is None or self.state_machine.current_state != "Sta6":
            super()._read_pdu_data()
            return
        sock = self.socket
        head = sock.recv(6)
        body = bytearray()
        if len(head) == 6 and head[0] == P_DATA_TYPE:
            body = sock.recv(int.from_bytes(head[2:6], "big"))
            if len(body) == int.from_bytes(head[2:6], "big"):
                try:
                    if receiver.feed(body):
                        return
                except FramingError as exc:
                    LOGGER.error("aborting association: %s", exc)
                    self.event_queue.put("Evt19")  # invalid PDU: A-ABORT (PS3.8 9.2, AA-8)
                    return
        sock.unread(head + body)
        super()._read_pdu_data()

    def kill_dul(self) -> None:
        super().kill_dul()
        self.nudge()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self.nudge()
        return super().stop_dul()

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        except Exception as exc:  # noqa: BLE001 - a peer's PDU out of turn or malformed
            # pynetdicom's state machine raised (e.g. InvalidEventError); its thread
            # ends here as it would have, and the association closes the connection.
            LOGGER.error("connection dropped after a protocol error: %s", exc)
        finally:
            if self.receiver is not None:
                self.receiver.abandon()  # a C-STORE cut off mid-transfer leaves no file
            self.assoc._reactor_checkpoint.work.set()  # the association notices the end at once


def _close_pair(*pair: socket.socket) -> None:
    for sock in pair:
        sock.close()


class WorkCheckpoint(threading.Event):
    """pynetdicom's reactor pause switch, which now also waits for work.

    The association reactor calls wait() once per loop, after its 1 ms nap;
    here that wait first blocks until a message or primitive arrives (or
    WAKE_CHECK_S passes), then honours a pause as before. Waiting for work
    first keeps pynetdicom's pause protocol intact: a thread that paused the
    reactor to read a response itself still gets that response.
    """

    work: threading.Event
    inbox: queue.Queue  # DIMSE messages: one is served per loop, so more may wait

    def wait(self, timeout: float | None = None) -> bool:
        if self.inbox.empty():
            self.work.wait(WAKE_CHECK_S)
        self.work.clear()
        return super().wait(timeout)


class BulkSocket(AssociationSocket):
    """Reads a PDU in as few recv calls as the kernel allows (pynetdicom: 4 KiB each).

    The buffer grows with the data that actually arrives, never to the length
    a PDU header merely claims (a forged 4 GiB length would cost 4 GiB of RAM),
    and a read that waits longer than the socket timeout returns what it has:
    pynetdicom then sees a short PDU and closes the connection, so a peer that
    stops mid-PDU does not hold its association slot forever.
    """

    ended = False  # the peer closed the connection, or stalled mid-PDU
    readable = False  # select() saw data (or the end) since the last read
    _unread = b""  # bytes put back, returned before the socket's

    def unread(self, data: bytes) -> None:
        """Put `data` back: the next reads return it first."""
        self._unread = bytes(data) + self._unread

    @property
    def ready(self) -> bool:
        if self._unread or (self.readable and self._is_connected and self.socket is not None):
            return True
        return super().ready

    def recv(self, nr_bytes: int) -> bytearray:
        self.readable = False
        buffer = bytearray(min(nr_bytes, FIRST_READ))
        received = 0
        if self._unread:
            taken, self._unread = self._unread[:nr_bytes], self._unread[nr_bytes:]
            buffer[:len(taken)] = taken
            received = len(taken)
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


def tune_connection(event: Event, store: StoreHandler | None = None) -> None:
    """EVT_CONN_OPEN handler: Nagle off and reads bounded by the network timeout for
    both directions; no polling as acceptor.

    An acceptor's threads have not started yet when this runs, so their loops
    can be changed safely; our requestors (C-MOVE, commitment) have their own
    sender (pdata.py, scu.py) and are left as pynetdicom made them. A TLS
    connection arrives here after its handshake; an SSLSocket takes the
    socket option and `recv_into` like a plain one.
    """
    assoc = event.assoc
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(assoc.network_timeout)  # pynetdicom's reads have none mid-PDU
        except OSError:
            pass
    if type(assoc.dul.socket) is AssociationSocket:
        assoc.dul.socket.__class__ = BulkSocket
    if assoc.is_acceptor and type(assoc.dul) is DULServiceProvider:
        work = threading.Event()
        assoc._reactor_checkpoint.__class__ = WorkCheckpoint
        assoc._reactor_checkpoint.work = work
        assoc._reactor_checkpoint.inbox = assoc.dimse.msg_queue
        for inbox in (assoc.dimse.msg_queue, assoc.dul.to_user_queue):
            inbox.__class__ = SignallingQueue
            inbox.signal = work.set
        assoc.dul.__class__ = WakefulDUL
        assoc.dul.install()
        if store is not None and isinstance(assoc.dul.socket, BulkSocket):
            assoc.dul.receiver = StoreReceiver(assoc, store)
