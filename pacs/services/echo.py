"""C-ECHO (Verification): success once the association is accepted, unless not permitted."""
import logging

from pydicom import Dataset
from pynetdicom.association import Association
from pynetdicom.events import Event

from pacs import activity
from pacs.access import REFUSAL, allowed
from pacs.statuses import ECHO_NOT_PERMITTED, SUCCESS, status

log = logging.getLogger(__name__)


def handle_echo(event: Event) -> Dataset:
    """EVT_C_ECHO, for the requests pynetdicom receives (`pacs.receiver` takes most)."""
    return answer_echo(event.assoc)


def answer_echo(assoc: Association) -> Dataset:
    """Counted in the association's line; DEBUG only, as monitors echo every few seconds."""
    activity.count(assoc, "C-ECHO")
    if not allowed(assoc, "C-ECHO", "echo", ECHO_NOT_PERMITTED):
        return status(ECHO_NOT_PERMITTED, REFUSAL)
    log.debug("#%d C-ECHO from %s, status 0x0000", activity.number(assoc),
              assoc.requestor.ae_title)
    return status(SUCCESS)
