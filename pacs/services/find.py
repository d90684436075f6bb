"""C-FIND SCP, Patient Root and Study Root (PS3.4 C.4.1): the index answers, this maps statuses.

Statuses: a pending 0xFF00 per match, then Success; 0xA900 with an ErrorComment
(and the Offending Element) when the identifier does not fit the model; 0xFE00
once a C-CANCEL arrived; 0xA700 with an ErrorComment when `query.max_results`
cut the matches short (after that many pending responses) or the index is
unavailable; 0xC001 for anything unexpected, so a request always gets its answer.

Every response is written straight to the requester's socket, as the retrieve
services do (`services.dispatch` routes C-FIND here): pynetdicom would queue
each one for its DUL thread (with a pydicom-built command set and identifier,
~0.5 ms each) and let the query run ahead of a slow reader, holding every
unsent match in memory. Written here, a response costs one `sendall` of a
command set built by hand and the identifier encoded by `Answer.encode`, and
the cursor advances only as fast as the requester reads.
"""
from __future__ import annotations

import logging
import struct
from typing import Iterator

from peewee import PeeweeException
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pynetdicom.dsutils import encode
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from pacs.access import REFUSAL, permitted
from pacs.activity import Operation, final_code
from pacs.archive import Archive
from pacs.index.answer import Answer
from pacs.index.postgres import discard_broken_connection
from pacs.index.query import Find, QueryError, QueryOptions
from pacs.index.levels import PATIENT_ROOT, STUDY_ROOT
from pacs.pdata import DATA_SET, NO_DATA_SET, command_set, text, ui, us
from pacs.services.retrieve import RequesterWriter
from pacs.statuses import (
    CANCEL, IDENTIFIER_MISMATCH, NOT_PERMITTED, OUT_OF_RESOURCES, PENDING, SUCCESS,
    UNABLE_TO_PROCESS, status,
)

log = logging.getLogger(__name__)
ROOTS = {
    PatientRootQueryRetrieveInformationModelFind: PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelFind: STUDY_ROOT,
}
FIND_CLASSES = tuple(ROOTS)
C_FIND_RSP = 0x8020
Response = tuple[Dataset | int, Dataset | None]


class ResponseWriter:
    """Writes the C-FIND-RSP messages of one request on the requester's socket."""

    def __init__(self, event: Event):
        request = event.request
        self._writer = RequesterWriter(event.assoc)
        self._context_id = event.context.context_id
        syntax = UID(event.context.transfer_syntax)
        self._syntax = (syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
        self._by_hand = syntax.is_little_endian and not syntax.is_deflated
        self._header = {0x0002: ui(request.AffectedSOPClassUID), 0x0100: us(C_FIND_RSP),
                        0x0120: us(request.MessageID)}
        self._command = command_set({**self._header, 0x0800: us(DATA_SET),
                                     0x0900: us(PENDING)})

    def send(self, answer: Answer) -> None:
        """Raises OSError when the connection fails, ValueError when the answer won't encode."""
        if self._by_hand:
            encoded = answer.encode(implicit_vr=self._syntax[0])
        else:  # Explicit VR Big Endian or Deflated: rare enough for pydicom's pace
            encoded = encode(answer.dataset(), *self._syntax)
        if encoded is None:
            raise ValueError("a response identifier cannot be encoded")
        self._writer.send(self._context_id, self._command, encoded)

    def final(self, response: Dataset | int) -> None:
        """The final response: a status code, or a status Dataset with its comment and
        Offending Element (PS3.7 9.3.2.2). Raises OSError when the connection fails."""
        elements = {**self._header, 0x0800: us(NO_DATA_SET)}
        if isinstance(response, int):
            elements[0x0900] = us(response)
        else:
            elements[0x0900] = us(response.Status)
            if response.get("ErrorComment"):
                elements[0x0902] = text(response.ErrorComment)
            offending = response.get("OffendingElement")
            if offending is not None:
                tags = offending if isinstance(offending, (list, MultiValue)) else [offending]
                elements[0x0901] = b"".join(struct.pack("<HH", tag >> 16, tag & 0xFFFF)
                                            for tag in tags)
        self._writer.send(self._context_id, command_set(elements))


def handle_find(event: Event, archive: Archive) -> None:
    """EVT_C_FIND (routed by `services.dispatch`): send every response, the final one last."""
    op = Operation(event, "C-FIND", ROOTS[event.request.AffectedSOPClassUID])
    writer = ResponseWriter(event)
    for response, _ in _answers(event, archive, op, writer):
        code = final_code(response)
        if code is not None:
            op.finish(code, str(getattr(response, "ErrorComment", "") or ""))
        try:
            writer.final(response)
        except OSError as exc:
            log.debug("C-FIND from %s: cannot answer (%s)", event.assoc.requestor.ae_title, exc)


def _answers(event: Event, archive: Archive, op: Operation,
             writer: ResponseWriter) -> Iterator[Response]:
    if not permitted(event, "find", NOT_PERMITTED):
        yield status(NOT_PERMITTED, REFUSAL), None
        return
    try:
        yield from _find(event, archive, op, writer)
    except OSError as exc:  # the requester's connection failed: nobody to answer
        op.finish(None, str(exc))
    except PeeweeException as exc:
        log.error("C-FIND from %s: index unavailable: %s", event.assoc.requestor.ae_title, exc)
        discard_broken_connection()
        yield status(OUT_OF_RESOURCES, f"index unavailable: {exc}"), None
    except Exception as exc:  # a bug: answer rather than leave the requester waiting
        log.exception("C-FIND from %s failed", event.assoc.requestor.ae_title)
        yield status(UNABLE_TO_PROCESS, f"internal error: {exc}"), None


def _find(event: Event, archive: Archive, op: Operation,
          writer: ResponseWriter) -> Iterator[Response]:
    """The final response; the pending ones go out by `writer`, counted in `op.count`."""
    config = archive.config
    try:
        identifier = event.identifier
    except Exception as exc:  # the identifier does not even decode
        yield status(IDENTIFIER_MISMATCH, f"cannot decode the identifier: {exc}"), None
        return
    try:
        find = Find(identifier, ROOTS[event.request.AffectedSOPClassUID],
                    QueryOptions(config.ae_title, config.query.case_insensitive_pn))
    except QueryError as exc:
        yield _refusal(exc), None
        return
    limit = config.query.max_results
    for answer in find.responses():
        if event.is_cancelled:
            yield CANCEL, None
            return
        if limit and op.count == limit:
            yield status(OUT_OF_RESOURCES,
                         f"more than {limit} matches; only the first {limit} were sent"), None
            return
        op.count += 1
        writer.send(answer)
    yield SUCCESS, None


def _refusal(exc: QueryError) -> Dataset:
    answer = status(IDENTIFIER_MISMATCH, str(exc))
    if exc.tag is not None:
        answer.OffendingElement = [exc.tag]
    return answer
