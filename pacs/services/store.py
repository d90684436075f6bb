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
from typing import Callable

from pydicom import Dataset
from pynetdicom.association import Association
from pynetdicom.events import Event

from pacs.access import REFUSAL, allowed
from pacs import activity
from pacs.archive import Archive, InvalidInstance, OutOfResources
from pacs.statuses import (
    CANNOT_UNDERSTAND, DATASET_MISMATCH, NOT_PERMITTED, OUT_OF_RESOURCES, SUCCESS, status,
)

log = logging.getLogger(__name__)
_receive_folder: Path | None = None
_check_space: Callable[[], None] | None = None


def receive_into(folder: Path | None, check_space: Callable[[], None] | None = None) -> None:
    """Make new receive files in `folder` (None: the system temp folder).

    `check_space` (the archive's free-space reserve) runs before each file is
    opened and raises OutOfResources to refuse a transfer before it writes.
    """
    global _receive_folder, _check_space
    _receive_folder, _check_space = folder, check_space


class ReceiveFile:
    """The file one incoming C-STORE data set is written to, surviving disk errors.

    pynetdicom creates and writes it on the association's network thread, where
    an OSError (unwritable staging folder, full disk) would kill the association
    without any response. Here the first problem is kept and further data
    dropped, so the handler can answer 0xA700 and the association goes on. Below
    the free-space reserve no file is made at all: nothing is written.
    """

    def __init__(self, folder: Path | None, check_space: Callable[[], None] | None = None):
        self.refusal: str | None = None  # why the data set is not kept: the ErrorComment
        self.name = ""  # no file yet; pynetdicom's later unlink("") fails quietly
        self._fd: int | None = None  # written with os.write: no file object's fstat/ioctl/lseek
        try:
            if check_space is not None:
                check_space()
            self._fd, self.name = tempfile.mkstemp(suffix=".dcm", dir=folder)
        except OutOfResources as exc:
            self.refusal = str(exc)
        except OSError as exc:
            self.refusal = _cannot_write(exc)
            log.error("cannot create a receive file in %s: %s", folder, exc)

    @property
    def file(self) -> ReceiveFile:
        """pynetdicom flushes through `.file`, as on a NamedTemporaryFile."""
        return self

    def write(self, data: bytes) -> int:
        if self._fd is not None:
            try:
                with memoryview(data) as view:
                    written = 0
                    while written < len(view):
                        written += os.write(self._fd, view[written:])
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered."""

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError as exc:
                self.refusal = self.refusal or _cannot_write(exc)

    def discard(self) -> None:
        """Close and delete the file: a failed write or a transfer that never completed."""
        self.close()
        if self.name:
            try:
                os.unlink(self.name)
            except OSError:
                pass

    def moved(self) -> None:
        """The archive took the file (renamed or deleted it): nothing left to discard."""
        self.close()
        self.name = ""

    def _fail(self, exc: OSError) -> None:
        log.error("cannot write received data to %s: %s", self.name, exc)
        self.refusal = _cannot_write(exc)
        self.discard()


def _cannot_write(exc: OSError) -> str:
    return f"cannot write the received data: {exc.strerror or exc}"


def open_receive_file(*_args: object, **_kwargs: object) -> ReceiveFile:
    """Stands in for pynetdicom's NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")."""
    return ReceiveFile(_receive_folder, _check_space)


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
    """EVT_C_STORE, for the requests pynetdicom receives (`pacs.receiver` takes most)."""
    return receive_store(archive, event.assoc, str(event.request.AffectedSOPInstanceUID or ""),
                         event.request._dataset_file)


def receive_store(archive: Archive, assoc: Association, affected: str,
                  received: ReceiveFile) -> Dataset:
    """File one received C-STORE data set; the status to answer.

    Each failure is logged (WARNING/ERROR), each success at DEBUG only and
    counted for the association's line and audit events (see `pacs.activity`).
    """
    answer = _store(archive, assoc, affected, received)
    if answer.Status != SUCCESS:
        activity.store_failed(assoc, answer.Status, answer.get("ErrorComment", ""))
    return answer


def _store(archive: Archive, assoc: Association, affected: str, received: ReceiveFile) -> Dataset:
    if not allowed(assoc, "C-STORE", "store", NOT_PERMITTED):
        return status(NOT_PERMITTED, REFUSAL)  # the caller deletes the received file
    if received.refusal is not None:
        log.error("#%d C-STORE from %s refused (0xA700): %s", activity.number(assoc),
                  assoc.requestor.ae_title, received.refusal)
        return status(OUT_OF_RESOURCES, received.refusal)
    try:
        result = archive.ingest(Path(received.name), affected_sop_uid=affected, owned=True)
        received.moved()
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
