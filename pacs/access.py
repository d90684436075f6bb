"""Who may associate, and which operations each caller may ask for.

The rules come from `security` and `remote_aes` (INTERFACE.md). They are
checked in two places, both for every listening port of an AE (plain or TLS):

- at association set-up, before presentation contexts are negotiated: a
  rejected caller gets A-ASSOCIATE-RJ, rejected-permanent, service-user, with
  reason 7 "called AE title not recognized" or 3 "calling AE title not
  recognized" (PS3.8 9.3.4). The called title is checked first, as pynetdicom
  and DCMTK's dcmqrscp do;
- per DIMSE request: the service handlers ask :func:`permitted` and answer a
  refusal with their own failure status (see `pacs.statuses.NOT_PERMITTED`).

pynetdicom offers only static lists for the first check (`require_calling_aet`),
without host checks or reload, so :func:`guard` wraps its acceptor negotiation
for the AEs it is given, as `services.dispatch` does for the retrieve services.
The rules are read through a callable on every check, so a reload (SIGHUP)
applies to the next association and the next request, and running
associations stay up.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import weakref
from typing import Callable

from pynetdicom import AE, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.events import Event

from pacs import activity
from pacs.config import Config

log = logging.getLogger(__name__)
REJECTED_PERMANENT, SERVICE_USER = 0x01, 0x01      # A-ASSOCIATE-RJ Result, Source (PS3.8 9.3.4)
CALLING_AE_NOT_RECOGNIZED, CALLED_AE_NOT_RECOGNIZED = 0x03, 0x07  # Reason/Diag.
REFUSAL = "not permitted"                          # the ErrorComment of every refused operation

Rules = Callable[[], "Policy"]
_GUARDED: "weakref.WeakKeyDictionary[AE, Rules]" = weakref.WeakKeyDictionary()
_STOCK_NEGOTIATE = ACSE._negotiate_as_acceptor


class Policy:
    """The access rules of one config, with the hosts of `check_host` peers resolved once."""

    def __init__(self, config: Config):
        self.ae_title = config.ae_title.strip()
        self.security = config.security
        self.remote_aes = {title.strip(): remote for title, remote in config.remote_aes.items()}
        self._hosts = {title: _addresses(remote.host)
                       for title, remote in self.remote_aes.items() if remote.check_host}

    def admit(self, calling: str, called: str, address: str) -> int | None:
        """None to accept an association, else the A-ASSOCIATE-RJ reason."""
        if self.security.require_called_ae and called.strip() != self.ae_title:
            return CALLED_AE_NOT_RECOGNIZED
        calling = calling.strip()
        if calling not in self.remote_aes:
            return None if self.security.allow_unknown_callers else CALLING_AE_NOT_RECOGNIZED
        hosts = self._hosts.get(calling)
        if hosts is not None and _normal(address) not in hosts:
            return CALLING_AE_NOT_RECOGNIZED
        return None

    def permits(self, calling: str, operation: str) -> bool:
        """May this caller ask for `operation` (echo, store, find, move, get)?

        Callers not in `remote_aes` (admitted only when unknown callers are
        allowed) may do everything, as before access control existed.
        """
        remote = self.remote_aes.get(calling.strip())
        return remote is None or operation in remote.permissions


def _normal(address: str) -> str:
    """An IP address in one spelling: IPv4-mapped IPv6 (`::ffff:1.2.3.4`) as IPv4."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def _addresses(host: str) -> frozenset[str]:
    """Every address `host` resolves to; the name itself when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        log.warning("remote_aes: cannot resolve %s (%s); check_host compares it literally",
                    host, exc)
        return frozenset({host})
    return frozenset(_normal(info[4][0]) for info in infos)


def guard(ae: AE, rules: Rules) -> None:
    """Check every association `ae` accepts, and let its handlers ask :func:`permitted`."""
    ae.require_called_aet = False  # checked by Policy.admit, with the rules in force
    ACSE._negotiate_as_acceptor = _negotiate_as_acceptor
    _GUARDED[ae] = rules


def permitted(event: Event, operation: str, refusal: int) -> bool:
    """May the requester of `event` ask for `operation`? Logs a refusal with the status
    the handler answers it with (`refusal`), as the operation lines do."""
    service = event.event.name.removeprefix("EVT_").replace("_", "-")  # C-STORE, N-ACTION
    return allowed(event.assoc, service, operation, refusal)


def allowed(assoc: Association, service: str, operation: str, refusal: int) -> bool:
    """:func:`permitted` for a request that came without a pynetdicom event (`pacs.receiver`)."""
    rules = _GUARDED.get(assoc.ae)
    calling = assoc.requestor.ae_title
    if rules is None or rules().permits(calling, operation):
        return True
    log.warning("#%d %s from %s refused (0x%04X): %s %s", activity.number(assoc), service,
                calling, refusal, operation, REFUSAL)
    return False


def _negotiate_as_acceptor(acse: ACSE) -> None:
    rules = _GUARDED.get(acse.assoc.ae)
    if rules is not None:
        request = acse.requestor.primitive
        address = acse.requestor.address if acse.requestor.address_info else ""
        reason = rules().admit(request.calling_ae_title, request.called_ae_title, address)
        if reason is not None:
            acse.requestor.ae_title = request.calling_ae_title
            log.warning("association from %s at %s to %s rejected: %s AE title not recognized",
                        request.calling_ae_title, address, request.called_ae_title,
                        "calling" if reason == CALLING_AE_NOT_RECOGNIZED else "called")
            # What pynetdicom does with its own rejections.
            acse.send_reject(REJECTED_PERMANENT, SERVICE_USER, reason)
            evt.trigger(acse.assoc, evt.EVT_REJECTED, {})
            acse.assoc.kill()
            return
    _STOCK_NEGOTIATE(acse)
