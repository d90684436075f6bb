"""`pacs audit`: read the time window from the command line, print the audit events."""
from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any, TextIO

from pacs.index.audit import read_events
from pacs.index.models import AuditEvent

_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
FORMS = ("an ISO date or time (2024-05-01, 2024-05-01T08:00Z) "
         "or a duration back from now (90m, 12h, 7d, 2w)")


class BadTime(ValueError):
    """A --since/--until value that is neither an ISO date-time nor a duration."""


def parse_moment(text: str, now: datetime | None = None) -> datetime:
    """An ISO date or date-time (local time unless it says otherwise), or `now` minus a
    duration; as naive UTC, the form the audit table keeps."""
    value = text.strip()
    match = _DURATION.fullmatch(value)
    if match:
        now = now or datetime.now(timezone.utc)
        moment = now - timedelta(**{_UNITS[match[2]]: int(match[1])})
    else:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise BadTime(f"cannot read {text!r}: expected {FORMS}") from None
        if moment.tzinfo is None:
            moment = moment.astimezone()  # the local zone, as an admin types it
    return moment.astimezone(timezone.utc).replace(tzinfo=None)


def print_events(out: TextIO, since: datetime, until: datetime | None, event: str | None,
                 calling_ae: str | None, as_json: bool) -> int:
    """One line per event (JSON Lines with `as_json`); return how many."""
    printed = 0
    for row in read_events(since, until, event, calling_ae):
        out.write((json.dumps(_as_dict(row)) if as_json else _line(row)) + "\n")
        printed += 1
    return printed


def _as_dict(row: AuditEvent) -> dict[str, Any]:
    return {
        "time": row.time.isoformat(timespec="milliseconds") + "Z", "event": row.event,
        "calling_ae": row.calling_ae, "peer": row.peer, "status": row.status,
        "count": row.count, "failed": row.failed, "destination": row.destination,
        "patient_id": row.patient_id, "studies": row.studies.split("\\") if row.studies else [],
        "detail": row.detail,
    }


def _line(row: AuditEvent) -> str:
    if row.status is None:
        status = "status=lost"
    elif row.event == "reject":
        status = f"reason={row.status}"  # A-ASSOCIATE-RJ reason/diag., not a DIMSE status
    else:
        status = f"status=0x{row.status:04X}"
    parts = [row.time.isoformat(timespec="milliseconds") + "Z", row.event,
             f"{row.calling_ae}@{row.peer}", status, f"count={row.count}"]
    if row.failed:
        parts.append(f"failed={row.failed}")
    if row.destination:
        parts.append(f"to={row.destination}")
    if row.patient_id:
        parts.append(f"patient={row.patient_id}")
    if row.studies:
        parts.append(f"studies={row.studies}")
    if row.detail:
        parts.append(f"[{row.detail}]")
    return " ".join(parts)
