"""C-STORE: hand the received file to the archive, map its errors to statuses.

pynetdicom writes the received dataset, with file meta, straight to a
:class:`ReceiveFile` in the store's staging folder (STORE_RECV_CHUNKED_DATASET);
the archive moves that file into place, so the bytes are stored exactly as
received and never decoded.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from pydicom import Dataset
from pynetdicom.events import Event

from pacs.access import REFUSAL, permitted
from pacs import activity
from pacs.archive import Archive, InvalidInstance, OutOfResources
from pacs.statuses import (
    CANNOT_UNDERSTAND, DATASET_MISMATCH, NOT_PERMITTED, OUT_OF_RESOURCES, SUCCESS, status,
)

log = logging.getLogger(__name__)
_receive_folder: Path | None = None


def receive_into(folder: Path | None) -> None:
    """Make new receive files in `folder` (None: the system temp folder)."""
    global _receive_folder
    _receive_folder = folder


class ReceiveFile:
    """The file one incoming C-STORE data set is written to, surviving disk errors.

    pynetdicom creates and writes it on the association's network thread, where
    an OSError (unwritable staging folder, full disk) would kill the association
    without any response. Here the first error is kept and further data dropped,
    so the handler can answer 0xA700 and the association goes on.
    """

    def __init__(self, folder: Path | None):
        self.error: OSError | None = None
        self._fp: BinaryIO | None = None
        try:
            fd, self.name = tempfile.mkstemp(suffix=".dcm", dir=folder)
        except OSError as exc:
            self.error, self.name = exc, ""  # no file; pynetdicom's later unlink("") fails quietly
            log.error("cannot create a receive file in %s: %s", folder, exc)
            return
        self._fp = os.fdopen(fd, "wb")

    @property
    def file(self) -> ReceiveFile:
        """pynetdicom flushes through `.file`, as on a NamedTemporaryFile."""
        return self

    def write(self, data: bytes) -> int:
        if self._fp is not None:
            try:
                self._fp.write(data)
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def flush(self) -> None:
        if self._fp is not None:
            try:
                self._fp.flush()
            except OSError as exc:
                self._fail(exc)

    def close(self) -> None:
        fp, self._fp = self._fp, None
        if fp is not None:
            try:
                fp.close()
            except OSError as exc:
                self.error = self.error or exc

    def discard(self) -> None:
        """Close and delete the file: a failed write or a transfer that never completed."""
        self.close()
        if self.name:
            try:
                os.unlink(self.name)
            except OSError:
                pass

    def _fail(self, exc: OSError) -> None:
        log.error("cannot write received data to %s: %s", self.name, exc)
        self.error = exc
        self.discard()


def open_receive_file(*_args: object, **_kwargs: object) -> ReceiveFile:
    """Stands in for pynetdicom's NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")."""
    return ReceiveFile(_receive_folder)


def discard_partial(event: Event) -> None:
    """On connection close, delete the receive file of a C-STORE cut off mid-transfer.

    pynetdicom deletes a receive file only after the handler ran, so an aborted
    transfer's file would otherwise wait in staging for the sweeper.
    """
    message = getattr(event.assoc.dimse, "message", None)
    received = getattr(message, "_data_set_file", None)
    if isinstance(received, ReceiveFile):
        received.discard()


def handle_store(event: Event, archive: Archive) -> Dataset:
    """EVT_C_STORE: each failure is logged (WARNING/ERROR), each success at DEBUG only and
    counted for the association's line and audit events (see `pacs.activity`)."""
    answer = _store(event, archive)
    if answer.Status != SUCCESS:
        activity.store_failed(event.assoc, answer.Status, answer.get("ErrorComment", ""))
    return answer


def _store(event: Event, archive: Archive) -> Dataset:
    affected = str(event.request.AffectedSOPInstanceUID or "")
    assoc = event.assoc
    received = event.request._dataset_file
    if not permitted(event, "store", NOT_PERMITTED):
        return status(NOT_PERMITTED, REFUSAL)  # pynetdicom deletes the received file
    if isinstance(received, ReceiveFile) and received.error is not None:
        problem = f"cannot write the received data: {received.error.strerror or received.error}"
        log.error("#%d C-STORE from %s refused (0xA700): %s", activity.number(assoc),
                  assoc.requestor.ae_title, problem)
        return status(OUT_OF_RESOURCES, problem)
    try:
        result = archive.ingest(event.dataset_path, affected_sop_uid=affected, owned=True)
    except InvalidInstance as exc:
        # Unparsable data: 0xC000 "Cannot understand"; wrong or missing UIDs:
        # 0xA900 "Data Set does not match SOP Class" (PS3.4 B.2.3), as dcm4chee does.
        code = CANNOT_UNDERSTAND if str(exc).startswith("cannot parse") else DATASET_MISMATCH
        log.warning("#%d C-STORE from %s refused (0x%04X): %s", activity.number(assoc),
                    assoc.requestor.ae_title, code, exc)
        return status(code, str(exc))
    except OutOfResources as exc:
        log.error("#%d C-STORE from %s refused (0xA700): %s", activity.number(assoc),
                  assoc.requestor.ae_title, exc)
        return status(OUT_OF_RESOURCES, str(exc))
    activity.stored(assoc, result.study_uid, result.patient_id)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("#%d C-STORE from %s: %s of study %s %s, status 0x0000",
                  activity.number(assoc), assoc.requestor.ae_title, result.sop_uid,
                  result.study_uid, result.outcome.value)
    return status(SUCCESS)
