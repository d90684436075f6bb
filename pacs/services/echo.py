"""C-ECHO (Verification): success once the association is accepted, unless not permitted."""
from __future__ import annotations

from pydicom import Dataset
from pynetdicom.events import Event

from pacs.access import REFUSAL, permitted
from pacs.statuses import ECHO_NOT_PERMITTED, SUCCESS, status


def handle_echo(event: Event) -> Dataset:
    if not permitted(event, "echo"):
        return status(ECHO_NOT_PERMITTED, REFUSAL)
    return status(SUCCESS)
