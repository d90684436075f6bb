"""Write and read the audit trail (table AuditEvent)."""
from __future__ import annotations

from datetime import datetime
from typing import Any, Iterator, Mapping, Sequence

from pacs.index.db import write_transaction
from pacs.index.models import AuditEvent

EVENT_TYPES = ("store", "find", "move", "get", "reject")  # reject: A-ASSOCIATE-RJ


def write_events(rows: Sequence[dict[str, Any]],
                 counts: Mapping[int, tuple[int, int]] | None = None) -> list[int]:
    """Insert events and set (count, failed) of earlier ones by id, in one short write
    transaction; the ids of the inserted rows, in order."""
    if not rows and not counts:
        return []
    with write_transaction():
        for row_id, (count, failed) in (counts or {}).items():
            AuditEvent.update(count=count, failed=failed).where(AuditEvent.id == row_id).execute()
        return [AuditEvent.insert(row).execute() for row in rows]


def read_events(since: datetime, until: datetime | None = None, event: str | None = None,
                calling_ae: str | None = None) -> Iterator[AuditEvent]:
    """The events from `since` (UTC, naive) up to `until`, oldest first."""
    query = AuditEvent.select().where(AuditEvent.time >= since)
    if until is not None:
        query = query.where(AuditEvent.time < until)
    if event is not None:
        query = query.where(AuditEvent.event == event)
    if calling_ae is not None:
        query = query.where(AuditEvent.calling_ae == calling_ae)
    return query.order_by(AuditEvent.time, AuditEvent.id).iterator()
