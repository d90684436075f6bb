"""What each association did: its log lines and its audit events.

One INFO line per association (calling AE, peer, called AE, duration, outcome,
what it did) and one per C-FIND, C-MOVE or C-GET (model, level, keys, matches or
sub-operation counts, final status), WARNING when that status is a failure.
C-STORE and C-ECHO get a DEBUG line each and a count in the association's line:
a modality sends thousands of instances per study, one INFO line each would
bury everything else (Orthanc and dcm4chee also log stores per association at
their default level). Patient-identifying values only at DEBUG (`summary`).

pynetdicom's notification events (bound in `node.py`) follow an association:
EVT_CONN_OPEN starts its clock, EVT_RELEASED / EVT_ABORTED / EVT_REJECTED say how
it ended, and EVT_CONN_CLOSE, the last event of every connection, writes the
line and the rest of the audit events, in one short transaction, off the path
of every request. A C-STORE only bumps a per-study counter in memory, so audit
costs it nothing; a :class:`Flusher` thread writes the new rows of running
associations every FLUSH_EVERY_S (one transaction for all of them, and later
counts of a row already written as an update), so a crash or SIGKILL loses at
most that much of the trail of instances already indexed. A graceful stop
waits for the final writes, since pynetdicom's association thread waits for
its DUL.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from peewee import PeeweeException
from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event

from pacs.index.postgres import release_connection
from pacs.index.selection import key_values
from pacs.statuses import CANCEL, PENDING, PENDING_WARNING, SUCCESS
from pacs.summary import keys_summary

log = logging.getLogger("pacs.association")
oplog = logging.getLogger("pacs.operation")
_END_WAIT_S = 1.0  # see _finish
FLUSH_EVERY_S = 2.0  # audit rows of running associations are written this often
_numbers = itertools.count(1)
_activities: "weakref.WeakKeyDictionary[Association, Activity]" = weakref.WeakKeyDictionary()
# Taken out of _activities (so the flusher leaves them to on_close), still waiting in
# _finish for the event that says how they ended.
_closing: "weakref.WeakKeyDictionary[Association, Activity]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass
class _Stores:
    """An association's C-STOREs with one outcome: the instances of one study
    stored (status 0), or those answered with one failure status (study unknown)."""

    time: datetime
    status: int
    study: str = ""
    patient_id: str = ""
    detail: str = ""  # a failure's first ErrorComment
    done: int = 0

    def row(self) -> dict[str, Any]:
        stored = self.status == SUCCESS
        return {"time": self.time, "event": "store", "status": self.status,
                "count": self.done if stored else 0, "failed": 0 if stored else self.done,
                "patient_id": self.patient_id, "studies": self.study, "detail": self.detail}


class Activity:
    """One association's counters and audit events, changed by its own threads only;
    :meth:`write` (the flusher's thread or the closing one) only reads them."""

    def __init__(self) -> None:
        self.number = next(_numbers)
        self.started = time.monotonic()
        self.outcome = ""
        self.ended = threading.Event()
        self.operations: Counter[str] = Counter()
        self.stores: dict[tuple[str, int], _Stores] = {}  # by (study, status)
        self.events: list[dict[str, Any]] = []
        self._writing = threading.Lock()
        self._row_ids: dict[tuple[str, int], int] = {}  # store rows written: their id,
        self._written: dict[tuple[str, int], int] = {}  # ... and their `done` as written
        self._events_written = 0

    def write(self, archive: Any, calling_ae: str, peer: str) -> None:
        """Write what is new since the last write: new events and store rows, and the
        counts of store rows that grew since. Raises PeeweeException (nothing counts as
        written then, so the next write tries again)."""
        with self._writing:
            stores = self.stores.copy()  # atomic: the association's thread may add one now
            events = self.events[self._events_written:]
            new = [(key, entry.row()) for key, entry in stores.items()
                   if key not in self._row_ids]
            grown = {key: entry.row() for key, entry in stores.items()
                     if key in self._row_ids and entry.done != self._written[key]}
            rows = [row for _, row in new] + events
            for row in rows:
                row.update(calling_ae=calling_ae[:16], peer=peer)
            ids = archive.record_audit(rows, {self._row_ids[key]: (row["count"], row["failed"])
                                              for key, row in grown.items()})
            for (key, row), row_id in zip(new, ids):
                self._row_ids[key] = row_id
            for key, row in [*new, *grown.items()]:
                self._written[key] = row["count"] + row["failed"]
            self._events_written += len(events)

    def did(self) -> str:
        """What the association did, for its log line."""
        parts = []
        for service, count in sorted(self.operations.items()):
            if service == "C-STORE":
                studies = [e.done for e in self.stores.values() if e.status == SUCCESS]
                failed = sum(e.done for e in self.stores.values() if e.status != SUCCESS)
                parts.append(f"C-STORE {count} (stored {sum(studies)} in {len(studies)} "
                             f"stud{'y' if len(studies) == 1 else 'ies'}, {failed} failed)")
            else:
                parts.append(f"{service} {count}")
        return ", ".join(parts) or "no operations"


def activity(assoc: Association) -> Activity:
    found = _activities.get(assoc)
    if found is None:
        with _lock:
            found = _activities.setdefault(assoc, Activity())
    return found


def number(assoc: Association) -> int:
    """The association's number in this process, to tie operation lines to it."""
    return activity(assoc).number


def count(assoc: Association, service: str) -> None:
    activity(assoc).operations[service] += 1


def stored(assoc: Association, study_uid: str, patient_id: str) -> None:
    """One instance stored: the hot path, so only counters."""
    _count_store(assoc, study_uid, SUCCESS, patient_id=patient_id)


def store_failed(assoc: Association, code: int, comment: str) -> None:
    """One C-STORE answered with failure `code` (refused, not permitted, bad data)."""
    _count_store(assoc, "", code, detail=comment)


def _count_store(assoc: Association, study_uid: str, code: int, **first: str) -> None:
    record = activity(assoc)
    record.operations["C-STORE"] += 1
    entry = record.stores.get((study_uid, code))
    if entry is None:
        entry = record.stores[study_uid, code] = _Stores(utcnow(), code, study_uid, **first)
    entry.done += 1


class Operation:
    """One C-FIND, C-MOVE or C-GET request: its log line and its audit event."""

    def __init__(self, event: Event, service: str, root: str):
        self.assoc = event.assoc
        self.service = service
        self.model = f"{root.title()} Root"
        self.time = utcnow()
        self.level = ""
        self.patient_id = ""
        self.studies: list[str] = []
        self.destination = ""
        self.count = 0  # C-FIND matches, or C-MOVE/C-GET sub-operations completed
        count(self.assoc, service)
        try:
            identifier = event.identifier  # decoded once: pynetdicom keeps it for the service
        except Exception:  # the service refuses it with its own status
            self.keys = "(undecodable identifier)"
            return
        self.level = str(identifier.get("QueryRetrieveLevel", "") or "").strip()[:16]
        self.keys = keys_summary(identifier)
        self.patient_id = "\\".join(key_values(identifier, "PatientID"))[:256]
        self.studies = key_values(identifier, "StudyInstanceUID")
        if oplog.isEnabledFor(logging.DEBUG):
            oplog.debug("#%d %s identifier: %s", number(self.assoc), service,
                        keys_summary(identifier, reveal=True))

    def finish(self, code: int | None, comment: str = "", failed: int = 0,
               warning: int = 0) -> None:
        """Log the final status (None: the connection was lost) and keep the audit event."""
        kind = self.service[2:].lower()
        good = code is not None and (code in (SUCCESS, CANCEL) or code & 0xF000 == 0xB000)
        level = logging.INFO if good else logging.WARNING
        if oplog.isEnabledFor(level):
            if kind == "find":
                counts = f"{self.count} matches"
            else:
                counts = f"{self.count} completed, {failed} failed, {warning} warning"
            to = f" to {self.destination}" if self.destination else ""
            final = "connection lost" if code is None else f"status 0x{code:04X}"
            oplog.log(level, "#%d %s from %s%s: %s %s %s: %s, %s%s", number(self.assoc),
                      self.service, self.assoc.requestor.ae_title, to, self.model,
                      self.level or "-", self.keys, counts, final,
                      f" ({comment})" if comment else "")
        activity(self.assoc).events.append({
            "time": self.time, "event": kind, "status": code, "count": self.count,
            "failed": failed + warning, "destination": self.destination[:16],
            "patient_id": self.patient_id, "studies": "\\".join(self.studies),
            "detail": f"{self.model} {self.level or '-'} {self.keys}",
        })


def final_code(response: Dataset | int) -> int | None:
    """The status of a handler's response, None while it is pending."""
    code = response if isinstance(response, int) else int(response.Status)
    return None if code in (PENDING, PENDING_WARNING) else code


def on_open(event: Event) -> None:
    """EVT_CONN_OPEN: start the association's clock."""
    activity(event.assoc)


def on_end(event: Event) -> None:
    """EVT_RELEASED / EVT_ABORTED / EVT_REJECTED: note how the association ended.

    It may come after the connection closed: then on_close is waiting for it."""
    with _lock:
        record = _closing.get(event.assoc)
    record = record or activity(event.assoc)
    if not record.outcome:
        if event.event is evt.EVT_REJECTED:
            record.outcome = _rejection(event.assoc)
        else:
            record.outcome = "released" if event.event is evt.EVT_RELEASED else "aborted"
    record.ended.set()


def _rejection(assoc: Association) -> str:
    reject = assoc.acceptor.primitive
    return f"rejected ({reject.reason_str if reject is not None else 'no reason given'})"


def on_close(event: Event, archive: Any) -> None:
    """EVT_CONN_CLOSE: log the association's line and write the rest of its audit events."""
    assoc = event.assoc
    with _lock:
        record = _closing[assoc] = _activities.pop(assoc, None) or Activity()
    try:
        outcome = _finish(assoc, record)
    finally:
        with _lock:
            _closing.pop(assoc, None)
    caller, peer = _who(assoc)
    if not caller:  # a TCP probe, a port scan: no A-ASSOCIATE-RQ ever came
        log.debug("connection from %s closed without an association request", peer)
        return
    request = assoc.requestor.primitive
    called = request.called_ae_title if request is not None else "?"
    if assoc.is_rejected and assoc.acceptor.primitive is not None:
        record.events.append(_rejected_event(assoc.acceptor.primitive, called))
    if log.isEnabledFor(logging.INFO):
        log.info("association #%d %s@%s -> %s: %s after %.3f s; %s", record.number, caller,
                 peer, called, outcome, time.monotonic() - record.started, record.did())
    _write(record, archive, caller, peer)


def _who(assoc: Association) -> tuple[str, str]:
    """The calling AE title ("" before the A-ASSOCIATE-RQ) and the peer's address:port."""
    requestor = assoc.requestor
    peer = f"{requestor.address}:{requestor.port}" if requestor.address_info else "?"
    return requestor.ae_title, peer


def _write(record: Activity, archive: Any, caller: str, peer: str) -> None:
    try:
        record.write(archive, caller, peer)
    except PeeweeException as exc:
        log.error("association #%d: audit events not written: %s", record.number, exc)


class Flusher:
    """Writes the new audit rows of an AE's running associations every FLUSH_EVERY_S."""

    def __init__(self, ae: AE, archive: Any):
        self._ae = ae
        self._archive = archive
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-flusher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the write in progress, if any (closing associations write their own)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_EVERY_S):
            with _lock:
                running = [(assoc, record) for assoc, record in _activities.items()
                           if assoc.ae is self._ae]
            for assoc, record in running:
                caller, peer = _who(assoc)
                if caller:
                    _write(record, self._archive, caller, peer)
            release_connection()


def _rejected_event(reject: Any, called: str) -> dict[str, Any]:
    """The audit event of an A-ASSOCIATE-RJ: its status is the reason/diagnostic (PS3.8 9.3.4)."""
    return {"time": utcnow(), "event": "reject", "status": reject.diagnostic,
            "detail": f"A-ASSOCIATE-RJ {reject.result_str}, {reject.source_str}: "
                      f"{reject.reason_str}; called {called}"}


def _finish(assoc: Association, record: Activity) -> str:
    """How it ended. The DUL thread may close the connection a moment before the
    thread that ended the association triggers its event: wait briefly when our
    A-RELEASE-RP, A-ASSOCIATE-RJ or A-ABORT went out (state Sta13), and look for a
    peer's A-ABORT the association thread has not read yet. A rejection sent without
    EVT_REJECTED (by a handler of ours, say) still reads as one."""
    if assoc.is_rejected and not record.outcome:
        return _rejection(assoc)
    if not record.ended.is_set() and assoc.dul.state_machine.current_state == "Sta13":
        record.ended.wait(_END_WAIT_S)
    if record.outcome:
        return record.outcome
    peer_aborted = assoc.is_aborted or assoc.acse.is_aborted("a-abort")
    return "aborted" if peer_aborted else "aborted (connection closed)"
