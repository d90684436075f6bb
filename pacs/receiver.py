"""C-STORE and C-ECHO requests received straight from their P-DATA-TF PDUs (PS3.8 9.3.5, PS3.7 9).

Why not pynetdicom's DIMSE provider for the hot path of a modality sending a
study: each PDU goes through its state machine and queues, each command set is
decoded with pydicom, the file meta is built and written with pydicom, and the
response goes back through the association thread with a pydicom-encoded command
set: ~2 ms of CPU per instance, more than the index and the file store take.
Here the DUL thread (`transport.WakefulDUL`) gives each P-DATA-TF PDU of the
established association to a `StoreReceiver` first: a C-STORE-RQ is parsed by
hand, its data set fragments are written to the staging file as they arrive,
the request is handed to `services.store` on that same thread once complete,
and the C-STORE-RSP is written to the socket with a hand-built command set.

A C-ECHO-RQ is answered here too, and the C-STORE-RSPs a C-GET requester sends
back for our sub-operations are parsed here and queued for `services.get` as
pynetdicom would. Everything else (C-FIND, C-MOVE, C-GET, N-ACTION, a command
set split over several PDUs, a context the association did not accept) is left
to pynetdicom, untouched: `feed` answers False before consuming anything. A PDU
that breaks the message framing while we own the message aborts the association,
as pynetdicom does with a PDU it cannot place.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Callable

from pydicom import Dataset
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification

from pacs.pdata import (
    COMMAND, C_STORE_RQ, C_STORE_RSP, LAST, NO_DATA_SET, Command, command_set, parse_command,
    text, ui, us,
)
from pacs.services.echo import answer_echo
from pacs.services.retrieve import RequesterWriter
from pacs.services.store import ReceiveFile, open_receive_file
from pacs.statuses import HANDLER_FAILED, status

log = logging.getLogger(__name__)
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
_PDV_HEAD = struct.Struct(">IBB")  # item length, presentation context ID, message control header
_PREAMBLE = b"\x00" * 128 + b"DICM"

# Called with (association, Affected SOP Instance UID, received file); returns the status.
StoreHandler = Callable[[Association, str, ReceiveFile], Dataset]


class FramingError(ValueError):
    """P-DATA that does not continue the message being received (PS3.8 9.3.5)."""


@dataclass
class _Request:
    """The C-STORE-RQ being received: what its response needs, and its file."""

    context_id: int
    message_id: int
    sop_class: str
    sop_instance: str
    file: ReceiveFile


class StoreReceiver:
    """Receives the C-STORE requests of one association; used by its DUL thread only."""

    def __init__(self, assoc: Association, handler: StoreHandler):
        self._assoc = assoc
        self._handler = handler
        self._writer: RequesterWriter | None = None  # once the peer's maximum PDU is known
        self._request: _Request | None = None

    def feed(self, body: bytearray) -> bool:
        """Take one P-DATA-TF PDU body; False (nothing consumed) if it is pynetdicom's.

        Raises FramingError for P-DATA that breaks the message framing; the
        partial file is gone by then.
        """
        pdvs = _pdvs(body)
        if self._request is None:
            first = pdvs[0] if pdvs else None
            if (first is None or first[1] & (COMMAND | LAST) != COMMAND | LAST
                    or self._assoc.dimse.message is not None):  # pynetdicom is mid-message
                return False
            command = parse_command(bytes(body[first[2]:first[3]]))
            if command.us(0x0100) == C_STORE_RSP:
                return len(pdvs) == 1 and self._queue_response(first[0], command)
            if command.us(0x0100) == C_ECHO_RQ:
                return len(pdvs) == 1 and self._echo(first[0], command)
            self._request = self._start(first[0], command)
            if self._request is None:
                return False
            pdvs = pdvs[1:]
        request = self._request
        view = memoryview(body)
        for n, (context_id, flags, start, end) in enumerate(pdvs):
            if flags & COMMAND or context_id != request.context_id:
                self.abandon()
                raise FramingError(f"P-DATA on context {context_id} (flags {flags:#04x}) inside "
                                   f"the data set of a C-STORE-RQ on context {request.context_id}")
            request.file.write(view[start:end])
            if flags & LAST:
                if n != len(pdvs) - 1:
                    self.abandon()
                    raise FramingError("P-DATA after the last fragment of a data set")
                self._request = None
                self._complete(request)
        return True

    def abandon(self) -> None:
        """Drop a request cut off mid-transfer (connection closed, framing broken)."""
        request, self._request = self._request, None
        if request is not None:
            request.file.discard()

    def _start(self, context_id: int, command: Command) -> _Request | None:
        """The C-STORE-RQ this command set begins, if it is one we receive; else None."""
        context = self._assoc._accepted_cx.get(context_id)
        message_id = command.us(0x0110)
        sop_class, sop_instance = command.text(0x0002), command.text(0x1000)
        if (command.us(0x0100) != C_STORE_RQ or command.us(0x0800) in (None, NO_DATA_SET)
                or message_id is None or context is None
                or context.abstract_syntax != sop_class or not sop_instance.isascii()):
            return None  # pynetdicom answers or aborts as it always has
        request = _Request(context_id, message_id, sop_class, sop_instance, open_receive_file())
        request.file.write(file_meta(request.sop_class, request.sop_instance,
                                     str(context.transfer_syntax[0])))
        return request

    def _queue_response(self, context_id: int, command: Command) -> bool:
        """A C-STORE-RSP to one of our C-GET sub-operations: queue it as pynetdicom would,
        without its pydicom decoding of the command set (~0.3 ms an instance)."""
        responding_to, code = command.us(0x0120), command.us(0x0900)
        if responding_to is None or code is None:
            return False
        response = C_STORE()
        response.MessageIDBeingRespondedTo = responding_to
        response.Status = code
        if 0x0902 in command:
            response.ErrorComment = command.text(0x0902)
        self._assoc.dimse.msg_queue.put((context_id, response))
        return True

    def _echo(self, context_id: int, command: Command) -> bool:
        """Answer a C-ECHO-RQ on a Verification context here (pynetdicom's round trip
        through its queues and pydicom costs ~1 ms, a monitor's whole probe)."""
        context = self._assoc._accepted_cx.get(context_id)
        message_id = command.us(0x0110)
        if (context is None or context.abstract_syntax != Verification or message_id is None
                or command.us(0x0800) != NO_DATA_SET):
            return False
        self._respond(context_id, {0x0002: ui(Verification), 0x0100: us(C_ECHO_RSP),
                                   0x0120: us(message_id)}, answer_echo(self._assoc))
        return True

    def _complete(self, request: _Request) -> None:
        request.file.close()
        try:
            answer = self._handler(self._assoc, request.sop_instance, request.file)
        except Exception:  # a bug of ours: answer as pynetdicom does, keep serving
            log.exception("C-STORE handler failed")
            answer = status(HANDLER_FAILED, "internal error")
        finally:
            request.file.discard()  # moved into the store by now, unless refused
        self._respond(request.context_id, {
            0x0002: ui(request.sop_class), 0x0100: us(C_STORE_RSP),
            0x0120: us(request.message_id), 0x1000: ui(request.sop_instance)}, answer)

    def _respond(self, context_id: int, elements: dict[int, bytes], answer: Dataset) -> None:
        """Send a response command set: `elements` plus the status and comment of `answer`."""
        elements[0x0800] = us(NO_DATA_SET)
        elements[0x0900] = us(answer.Status)
        if answer.get("ErrorComment"):
            elements[0x0902] = text(answer.ErrorComment)
        try:
            if self._writer is None:
                self._writer = RequesterWriter(self._assoc)
            self._writer.send(context_id, command_set(elements))
        except OSError as exc:  # the peer is gone: pynetdicom's reactor sees the end
            log.debug("response not sent: %s", exc)


def _pdvs(body: bytearray) -> list[tuple[int, int, int, int]]:
    """(context ID, control header, start, end of the fragment) of each PDV item."""
    out, pos, size = [], 0, len(body)
    while pos < size:
        if pos + 6 > size:
            raise FramingError("a PDV item header runs past the end of its PDU")
        length, context_id, flags = _PDV_HEAD.unpack_from(body, pos)
        end = pos + 4 + length
        if length < 2 or end > size:
            raise FramingError(f"a PDV item length of {length} does not fit its PDU")
        out.append((context_id, flags, pos + 6, end))
        pos = end
    return out


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 7.1), as pydicom writes it."""
    elements = b"".join((
        _explicit(0x0001, b"OB", b"\x00\x01"),
        _explicit(0x0002, b"UI", ui(sop_class)),
        _explicit(0x0003, b"UI", ui(sop_instance)),
        _explicit(0x0010, b"UI", ui(transfer_syntax)),
        _explicit(0x0012, b"UI", ui(PYNETDICOM_IMPLEMENTATION_UID)),
        _explicit(0x0013, b"SH", text(PYNETDICOM_IMPLEMENTATION_VERSION)),
    ))
    return _PREAMBLE + _explicit(0x0000, b"UL", struct.pack("<I", len(elements))) + elements


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, Explicit VR Little Endian."""
    if vr == b"OB":
        return struct.pack("<HH2sHI", 2, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 2, element, vr, len(value)) + value
