"""Storage Commitment Push Model SCP (PS3.4 J): may the modality delete its copies?

N-ACTION "Request Storage Commitment" (action type 1) is answered first; then
every referenced instance is checked: in the index, and its file on disk with
the recorded size. The N-EVENT-REPORT (event type 1: all committed, 2: some
failed, PS3.4 J.3.3) goes on the same association when it is still open a moment
after the response, else on a new association to the requester's `remote_aes` entry, proposing the SCP role
(PS3.4 J.3.3), as dcm4chee does (over TLS when the entry says `tls: true`). That new association is opened from another
thread so the requester's release is answered meanwhile.
"""
from __future__ import annotations

import logging
import threading
import time

from pydicom import Dataset
from pynetdicom import AE, build_role
from pynetdicom.dimse_primitives import N_ACTION
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, A_RELEASE
from pynetdicom.sop_class import StorageCommitmentPushModel

from pacs.access import REFUSAL, permitted
from pacs import activity
from pacs.archive import Archive, OutOfResources
from pacs.config import Config
from pacs.live import LiveConfig
from pacs.statuses import (
    CLASS_INSTANCE_CONFLICT, MISSING_ATTRIBUTE, NO_SUCH_ACTION, NOT_AUTHORIZED,
    NO_SUCH_OBJECT_INSTANCE, PROCESSING_FAILURE, SUCCESS, error_comment,
)
from pacs.tls import client_context

log = logging.getLogger(__name__)
PUSH_MODEL_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP Instance (PS3.4 J.3.5)
REQUEST_COMMITMENT = 1  # Action Type ID (PS3.4 J.3.2)
ALL_COMMITTED, SOME_FAILED = 1, 2  # Event Type IDs (PS3.4 J.3.3)
RELEASE_GRACE_S = 0.2
_CLOSING = (A_RELEASE, A_ABORT, A_P_ABORT)  # peeked, left for pynetdicom's reactor to act on


class BadRequest(Exception):
    """An N-ACTION refused with this status; the message is the ErrorComment."""

    def __init__(self, code: int, comment: str):
        super().__init__(comment)
        self.code = code


def _references(event: Event) -> tuple[str, list[tuple[str, str]]]:
    """The Transaction UID and (SOP class, SOP instance) pairs of an N-ACTION."""
    request = event.request
    if request.ActionTypeID != REQUEST_COMMITMENT:
        raise BadRequest(NO_SUCH_ACTION, f"action type {request.ActionTypeID} is not 1")
    if str(request.RequestedSOPInstanceUID) != PUSH_MODEL_INSTANCE:
        raise BadRequest(NO_SUCH_OBJECT_INSTANCE,
                         f"requested SOP Instance must be {PUSH_MODEL_INSTANCE}")
    try:
        info = event.action_information
    except Exception as exc:
        raise BadRequest(PROCESSING_FAILURE, f"cannot decode the action information: {exc}") from None
    transaction = str(info.get("TransactionUID", "") or "")
    if not transaction:
        raise BadRequest(MISSING_ATTRIBUTE, "TransactionUID (0008,1195) is missing")
    refs = []
    for item in info.get("ReferencedSOPSequence", None) or []:
        sop_class = str(item.get("ReferencedSOPClassUID", "") or "")
        sop_uid = str(item.get("ReferencedSOPInstanceUID", "") or "")
        if not sop_class or not sop_uid:
            raise BadRequest(MISSING_ATTRIBUTE, "a Referenced SOP Sequence item lacks its UIDs")
        refs.append((sop_class, sop_uid))
    if not refs:
        raise BadRequest(MISSING_ATTRIBUTE, "ReferencedSOPSequence (0008,1199) is empty")
    return transaction, refs


def _respond(event: Event, code: int, comment: str = "") -> None:
    request = event.request
    rsp = N_ACTION()
    rsp.MessageIDBeingRespondedTo = request.MessageID
    rsp.AffectedSOPClassUID = request.RequestedSOPClassUID
    rsp.AffectedSOPInstanceUID = request.RequestedSOPInstanceUID
    rsp.ActionTypeID = request.ActionTypeID
    rsp.Status = code
    if comment:
        rsp.ErrorComment = error_comment(comment)
    event.assoc.dimse.send_msg(rsp, event.context.context_id)


def _item(sop_class: str, sop_uid: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_uid
    if reason is not None:
        item.FailureReason = reason
    return item


def commitment_report(archive: Archive, transaction: str, refs: list[tuple[str, str]],
                      retrieve_ae: str) -> tuple[int, Dataset]:
    """The event type and Event Information for these references (PS3.4 J.3.3.1).

    When the index cannot be read, every reference fails with 0x0110 (processing
    failure), so the modality keeps its copies and may ask again.
    """
    try:
        held, trouble = archive.held(uid for _, uid in refs), None
    except OutOfResources as exc:
        log.error("storage commitment %s not checked: %s", transaction, exc)
        held, trouble = {}, PROCESSING_FAILURE
    report = Dataset()
    report.TransactionUID = transaction
    committed, failed = [], []
    for sop_class, sop_uid in refs:
        match = held.get(sop_uid)
        if match is None:
            failed.append(_item(sop_class, sop_uid, trouble or NO_SUCH_OBJECT_INSTANCE))
        elif match.sop_class_uid != sop_class:
            failed.append(_item(sop_class, sop_uid, CLASS_INSTANCE_CONFLICT))
        else:
            committed.append(_item(sop_class, sop_uid))
    if committed:
        report.RetrieveAETitle = retrieve_ae
        report.ReferencedSOPSequence = committed
    if failed:
        report.FailedSOPSequence = failed
    return (SOME_FAILED if failed else ALL_COMMITTED), report


def handle_commitment(event: Event, archive: Archive, live: LiveConfig) -> None:
    """EVT_N_ACTION, called by `services.dispatch`: answers, checks, reports.

    Asking for commitment counts as `store` in `remote_aes` permissions.
    """
    if not permitted(event, "store", NOT_AUTHORIZED):
        _respond(event, NOT_AUTHORIZED, REFUSAL)
        return
    config = live.current  # where a report on a new association goes: reloaded on SIGHUP
    caller = event.assoc.requestor.ae_title
    activity.count(event.assoc, "N-ACTION")
    try:
        transaction, refs = _references(event)
    except BadRequest as exc:
        log.warning("storage commitment from %s refused (0x%04X): %s", caller, exc.code, exc)
        _respond(event, exc.code, str(exc))
        return
    _respond(event, SUCCESS)
    event_type, report = commitment_report(archive, transaction, refs, config.ae_title)
    log.info("storage commitment %s from %s: %d of %d held", transaction, caller,
             len(report.get("ReferencedSOPSequence", [])), len(refs))
    if _report_here(event, event_type, report):
        return
    threading.Thread(target=_report_anew, args=(config, caller, event_type, report),
                     name=f"commitment-{caller}", daemon=True).start()


def _report_here(event: Event, event_type: int, report: Dataset) -> bool:
    """Send the report on the requester's association if it stays open for RELEASE_GRACE_S.

    A modality that wants the report on a new association releases right after
    the N-ACTION response; the grace lets that release arrive first, so the
    report does not cross it.
    """
    assoc = event.assoc
    deadline = time.monotonic() + RELEASE_GRACE_S
    while True:
        if not assoc.is_established or isinstance(assoc.dul.peek_next_pdu(), _CLOSING):
            return False
        if time.monotonic() >= deadline:
            break
        time.sleep(0.005)
    status, _ = assoc.send_n_event_report(report, event_type, StorageCommitmentPushModel,
                                          PUSH_MODEL_INSTANCE)
    return _delivered(status, assoc.requestor.ae_title, "the same association")


def _report_anew(config: Config, caller: str, event_type: int, report: Dataset) -> None:
    remote = config.remote_aes.get(caller)
    if remote is None:
        log.error("storage commitment report for %s not delivered: %s is not in remote_aes",
                  report.TransactionUID, caller)
        return
    ae = AE(ae_title=config.ae_title)
    ae.acse_timeout = config.network.acse_timeout
    ae.dimse_timeout = config.network.dimse_timeout
    ae.add_requested_context(StorageCommitmentPushModel)
    role = build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    tls = (client_context(config.tls), remote.host) if remote.tls else None
    assoc = ae.associate(remote.host, remote.port, ae_title=caller, ext_neg=[role], tls_args=tls)
    if not assoc.is_established:
        log.error("storage commitment report for %s not delivered: cannot associate with %s "
                  "at %s:%d", report.TransactionUID, caller, remote.host, remote.port)
        return
    try:
        status, _ = assoc.send_n_event_report(report, event_type, StorageCommitmentPushModel,
                                              PUSH_MODEL_INSTANCE)
        _delivered(status, caller, "a new association")
    finally:
        assoc.release()


def _delivered(status: Dataset, caller: str, how: str) -> bool:
    code = status.get("Status") if status is not None else None
    if code is None:
        log.warning("storage commitment report to %s on %s got no answer", caller, how)
        return False
    if code != SUCCESS:
        log.warning("storage commitment report to %s on %s answered 0x%04X", caller, how, code)
    return True

