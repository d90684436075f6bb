"""C-ECHO (Verification): always success once the association is accepted."""
from __future__ import annotations

from pynetdicom.events import Event

from pacs.statuses import SUCCESS


def handle_echo(event: Event) -> int:
    return SUCCESS
