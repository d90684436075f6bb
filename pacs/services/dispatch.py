"""Let our C-FIND, C-MOVE, C-GET and Storage Commitment handlers send their own responses.

pynetdicom's service classes answer for the handler, and their rules do not fit:
its C-FIND loop builds every response with pydicom and queues it for another
thread (a quarter of the time of a small query went to the final status alone);
its C-MOVE/C-GET loops want a decoded Dataset per instance, open one
sub-association with the AE's fixed contexts and answer 0xA801 without an
ErrorComment, even for a known but unreachable destination; its N-ACTION handler
returns before the response is sent, so the N-EVENT-REPORT cannot follow it on
the same association. For AEs passed to `enable`, these requests instead trigger
the bound EVT_C_FIND / EVT_C_MOVE / EVT_C_GET / EVT_N_ACTION handler with the usual
event, and the handler sends every response itself (`services.find`,
`services.retrieve`, `services.commitment`).

pynetdicom picks a service class through `association.uid_to_service_class`;
we wrap it once. Other AEs in the process keep pynetdicom's behaviour.
"""
from __future__ import annotations

import logging
import weakref

from pynetdicom import AE, association, evt
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, N_ACTION
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import QueryRetrieveServiceClass, ServiceClass
from pynetdicom.service_class_n import StorageCommitmentServiceClass

log = logging.getLogger(__name__)
_ENABLED: "weakref.WeakSet[AE]" = weakref.WeakSet()
_STOCK = association.uid_to_service_class
_EVENTS = {C_FIND: evt.EVT_C_FIND, C_MOVE: evt.EVT_C_MOVE, C_GET: evt.EVT_C_GET}


def _trigger(service: ServiceClass, event_type: evt.InterventionEvent,
             req: C_FIND | C_MOVE | C_GET | N_ACTION, context: PresentationContext) -> None:
    try:
        evt.trigger(service.assoc, event_type, {
            "request": req, "context": context.as_tuple, "_is_cancelled": service.is_cancelled,
        })
    except Exception:  # the handlers answer their own errors; this is a bug, keep serving
        log.exception("unhandled error in the %s handler", event_type.name)


class RetrieveServiceClass(QueryRetrieveServiceClass):
    """C-FIND, C-MOVE and C-GET by our handlers."""

    def SCP(self, req, context: PresentationContext) -> None:  # noqa: N802 - pynetdicom's name
        if self.assoc.ae in _ENABLED and isinstance(req, (C_FIND, C_MOVE, C_GET)):
            _trigger(self, _EVENTS[type(req)], req, context)
        else:
            super().SCP(req, context)


class CommitmentServiceClass(StorageCommitmentServiceClass):
    """Storage Commitment Push Model N-ACTION by our handler."""

    def SCP(self, req, context: PresentationContext) -> None:  # noqa: N802 - pynetdicom's name
        if self.assoc.ae in _ENABLED and isinstance(req, N_ACTION):
            _trigger(self, evt.EVT_N_ACTION, req, context)
        else:
            super().SCP(req, context)


def _route(uid: str) -> type[ServiceClass]:
    service = _STOCK(uid)
    if service is QueryRetrieveServiceClass:
        return RetrieveServiceClass
    if service is StorageCommitmentServiceClass:
        return CommitmentServiceClass
    return service


def enable(ae: AE) -> None:
    """Route this AE's C-FIND, C-MOVE, C-GET and commitment N-ACTION requests to our handlers."""
    association.uid_to_service_class = _route
    _ENABLED.add(ae)
