"""C-ECHO (Verification): always success once the association is accepted."""
from __future__ import annotations

import logging

from pynetdicom.events import Event

from pacs import activity
from pacs.statuses import SUCCESS

log = logging.getLogger(__name__)


def handle_echo(event: Event) -> int:
    """Counted in the association's line; DEBUG only, as monitors echo every few seconds."""
    activity.count(event.assoc, "C-ECHO")
    log.debug("#%d C-ECHO from %s, status 0x0000", activity.number(event.assoc),
              event.assoc.requestor.ae_title)
    return SUCCESS
