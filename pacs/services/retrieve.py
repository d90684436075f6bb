"""What C-MOVE and C-GET share: identifier -> instances -> sub-operations -> responses.

The handlers run in the requesting association's own thread (see
`services.dispatch`) and write every C-MOVE-RSP/C-GET-RSP on its socket through
`pdata.PDataWriter`: C-GET must, because its C-STORE sub-operations go over the
same socket and nothing may be interleaved with them; C-MOVE does too, so both
answer the same way. Response rules (PS3.4 C.4.2.1.5, C.4.2.3.1, C.4.3.1.4):
pending responses carry the four sub-operation counts, at least every
PENDING_EVERY instances or PENDING_INTERVAL_S; the final response is Success,
Warning 0xB000 when some failed or warned, 0xA702 when all failed, Cancel 0xFE00
after C-CANCEL, each with the Failed SOP Instance UID List when not Success.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from pydicom import Dataset
from pydicom.uid import UID
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from pacs.access import REFUSAL, permitted
from pacs.activity import Operation
from pacs.archive import Archive, OutOfResources
from pacs.index.levels import PATIENT_ROOT, STUDY_ROOT
from pacs.index.selection import Match, SelectionError
from pacs.pdata import DATA_SET, NO_DATA_SET, FileRegion, PDataWriter, command_set, text, ui, us
from pacs.sender import Sender, Tally
from pacs.statuses import (
    CANCEL, IDENTIFIER_MISMATCH, MATCHES_OUT_OF_RESOURCES, NOT_PERMITTED, PENDING,
    SUBOPS_OUT_OF_RESOURCES, SUBOPS_WARNING, SUCCESS, UNABLE_TO_PROCESS, error_comment,
)

log = logging.getLogger(__name__)
C_GET_RSP, C_MOVE_RSP = 0x8010, 0x8021  # Command Field (PS3.7 E.1)
PENDING_EVERY = 10
PENDING_INTERVAL_S = 1.0
MAX_SUBOPERATIONS = 65535  # the Number of ... Sub-operations elements are US (PS3.7 E.1)
ROOTS = {
    PatientRootQueryRetrieveInformationModelMove: PATIENT_ROOT,
    PatientRootQueryRetrieveInformationModelGet: PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelMove: STUDY_ROOT,
    StudyRootQueryRetrieveInformationModelGet: STUDY_ROOT,
}
RETRIEVE_CLASSES = tuple(ROOTS)

Deliver = Callable[[Sender, list[Match]], None]


class RequesterWriter(PDataWriter):
    """A writer on the requester's socket; pynetdicom's DUL thread still reads it.

    A TLS socket allows that too: `pacs.tls.SerializedSSLSocket` takes turns.
    Each message sent restarts the association's network timeout, which
    pynetdicom restarts only on what it receives: a C-FIND streaming matches or
    a C-MOVE reporting progress for longer than `network.network_timeout`
    would otherwise be aborted the moment it ended.
    """

    def __init__(self, assoc: Association):
        super().__init__(assoc.dul.socket.socket, assoc.dimse.maximum_pdu_size)
        self._idle = assoc.dul._idle_timer

    def send(self, context_id: int, command: bytes, data: bytes | FileRegion | None = None) -> None:
        super().send(context_id, command, data)
        self._idle.restart()


class Responder:
    """The responses to one C-MOVE or C-GET request."""

    def __init__(self, event: Event, writer: PDataWriter):
        self._event = event
        self._writer = writer
        self.op = Operation(event, self.kind, ROOTS[event.request.AffectedSOPClassUID])
        self._since = 0
        self._last = time.monotonic()
        self.gone = False  # the requester's connection failed: stop working for it

    def progress(self, tally: Tally) -> None:
        """After each sub-operation: a pending response when one is due."""
        self._since += 1
        due = self._since >= PENDING_EVERY or time.monotonic() - self._last >= PENDING_INTERVAL_S
        if tally.remaining and due:
            self._send(PENDING, tally=tally)

    def finish(self, sender: Sender) -> None:
        tally = sender.tally
        if sender.cancelled:
            code, comment = CANCEL, ""
        elif not tally.failed and not tally.warning:
            code, comment = SUCCESS, ""
        elif not tally.completed and not tally.warning:
            code = SUBOPS_OUT_OF_RESOURCES
            comment = sender.problem or f"all {tally.failed} sub-operations failed"
        else:
            code, comment = SUBOPS_WARNING, sender.problem
        self.op.count = tally.completed
        self.op.finish(code, comment, tally.failed, tally.warning)
        self._send(code, comment, tally)

    def permitted(self) -> bool:
        """May the caller ask for this C-MOVE or C-GET (`pacs.access`)? If not, answer so."""
        if permitted(self._event, "move" if self.kind == "C-MOVE" else "get",
                     NOT_PERMITTED):
            return True
        self.fail(NOT_PERMITTED, REFUSAL)
        return False

    def fail(self, code: int, comment: str) -> None:
        """A final failure before any sub-operation."""
        self.op.finish(code, comment)
        self._send(code, comment)

    @property
    def kind(self) -> str:
        return "C-MOVE" if isinstance(self._event.request, C_MOVE) else "C-GET"

    @property
    def caller(self) -> str:
        return self._event.assoc.requestor.ae_title

    def _send(self, code: int, comment: str = "", tally: Tally | None = None) -> None:
        """One response (PS3.7 9.3.4.2, 9.3.3.2), its command set built by hand: pending
        responses are frequent, and pynetdicom's encoder costs ~0.4 ms each."""
        request = self._event.request
        identifier = None
        if tally is not None and code not in (PENDING, SUCCESS):
            identifier = self._failed_list(tally.failed_uids)
        elements = {
            0x0002: ui(request.AffectedSOPClassUID),
            0x0100: us(C_MOVE_RSP if isinstance(request, C_MOVE) else C_GET_RSP),
            0x0120: us(request.MessageID),
            0x0800: us(NO_DATA_SET if identifier is None else DATA_SET),
            0x0900: us(code),
        }
        if comment:
            elements[0x0902] = text(error_comment(comment))
        if tally is not None:
            if code in (PENDING, CANCEL):
                elements[0x1020] = us(tally.remaining)
            elements[0x1021] = us(tally.completed)
            elements[0x1022] = us(tally.failed)
            elements[0x1023] = us(tally.warning)
        try:
            self._writer.send(self._event.context.context_id, command_set(elements), identifier)
        except OSError as exc:
            if not self.gone:
                log.warning("%s from %s: cannot answer (%s); stopping", self.kind, self.caller, exc)
            self.gone = True
        self._since, self._last = 0, time.monotonic()

    def _failed_list(self, uids: list[str]) -> bytes:
        ds = Dataset()
        ds.FailedSOPInstanceUIDList = uids
        syntax = UID(self._event.context.transfer_syntax)
        return encode(ds, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)


def serve_retrieve(event: Event, archive: Archive, responder: Responder, deliver: Deliver) -> None:
    """Select the instances the identifier names, let `deliver` send them, answer."""
    try:
        _serve(event, archive, responder, deliver)
    except Exception as exc:  # keep the association usable and the requester informed
        log.exception("retrieve failed")
        responder.fail(UNABLE_TO_PROCESS, f"internal error: {exc}")


def _serve(event: Event, archive: Archive, responder: Responder, deliver: Deliver) -> None:
    try:
        identifier = event.identifier
    except Exception as exc:
        responder.fail(IDENTIFIER_MISMATCH, f"cannot decode the identifier: {exc}")
        return
    try:
        matches = archive.select(identifier, ROOTS[event.request.AffectedSOPClassUID])
    except SelectionError as exc:
        responder.fail(IDENTIFIER_MISMATCH, str(exc))
        return
    except OutOfResources as exc:
        responder.fail(MATCHES_OUT_OF_RESOURCES, str(exc))
        return
    if len(matches) > MAX_SUBOPERATIONS:
        responder.fail(SUBOPS_OUT_OF_RESOURCES,
                       f"{len(matches)} instances; at most {MAX_SUBOPERATIONS} per request")
        return
    responder.op.studies = list(dict.fromkeys(match.study_uid for match in matches))
    responder.op.patient_id = "\\".join(dict.fromkeys(match.patient_id for match in matches))
    sender = Sender(len(matches), archive.file_path, responder.progress,
                    lambda: responder.gone or event.is_cancelled)
    if matches:
        deliver(sender, matches)
    responder.finish(sender)
