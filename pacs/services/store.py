"""C-STORE: hand the received file to the archive, map its errors to statuses.

pynetdicom writes the received dataset, with file meta, straight to a
temporary file (STORE_RECV_CHUNKED_DATASET); the archive moves that file into
place, so the bytes are stored exactly as received and never decoded.
"""
from __future__ import annotations

import logging

from pydicom import Dataset
from pynetdicom.events import Event

from pacs.archive import Archive, InvalidInstance, OutOfResources
from pacs.statuses import (
    CANNOT_UNDERSTAND, DATASET_MISMATCH, OUT_OF_RESOURCES, SUCCESS, status,
)

log = logging.getLogger(__name__)


def handle_store(event: Event, archive: Archive) -> Dataset:
    affected = str(event.request.AffectedSOPInstanceUID or "")
    caller = event.assoc.requestor.ae_title
    try:
        result = archive.ingest(event.dataset_path, affected_sop_uid=affected, owned=True)
    except InvalidInstance as exc:
        # Unparsable data: 0xC000 "Cannot understand"; wrong or missing UIDs:
        # 0xA900 "Data Set does not match SOP Class" (PS3.4 B.2.3), as dcm4chee does.
        code = CANNOT_UNDERSTAND if str(exc).startswith("cannot parse") else DATASET_MISMATCH
        log.warning("C-STORE from %s refused (0x%04X): %s", caller, code, exc)
        return status(code, str(exc))
    except OutOfResources as exc:
        log.error("C-STORE from %s refused (0xA700): %s", caller, exc)
        return status(OUT_OF_RESOURCES, str(exc))
    log.debug("C-STORE from %s: %s %s", caller, result.sop_uid, result.outcome.value)
    return status(SUCCESS)
