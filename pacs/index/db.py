"""Open the index database named by `database.url` (peewee: SQLite or PostgreSQL).

SQLite runs in WAL mode so queries never wait for ingest, with
`synchronous=FULL` when the store is durable (each group commit survives a
power cut) and a busy timeout so a second process waits instead of failing.

PostgreSQL may be shared by several nodes: writers retry a transaction the
server aborted for a deadlock or serialization failure, and large results
stream from a server-side cursor. Its connections: index/postgres.py.
"""
from __future__ import annotations

import fcntl
import logging
import os
import random
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from peewee import (
    Database, InterfaceError, OperationalError, PeeweeException, PostgresqlDatabase, SelectBase,
    SqliteDatabase,
)

from pacs.index.models import MODELS, AuditEvent, database
from pacs.index.postgres import connect_postgres, discard_broken_connection, sqlstate
from pacs.index.schema import SchemaError, create_schema, drop_schema

log = logging.getLogger(__name__)
BUSY_TIMEOUT_S = 10
WRITE_ATTEMPTS = 8
STREAM_BATCH = 500
# SQLSTATEs of a transaction the server aborted only because of a concurrent one
_RETRYABLE = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected
T = TypeVar("T")


class DatabaseURLError(ValueError):
    """`database.url` names no backend we support, or a database we cannot open."""


def open_database(url: str, durable: bool = True) -> Database:
    """Connect the models to the database at `url` and create or upgrade its schema."""
    with _naming(url):
        db = _make(url, durable)
        database.initialize(db)
        db.connect(reuse_if_open=True)
        create_schema(db)
    return db


def open_unbound(url: str) -> Database:
    """The database at `url` with its schema ready, the models left bound where they are.

    For copying one index into another (`pacs migrate`).
    """
    with _naming(url):
        db = _make(url, durable=True)
        db.connect()
        with db.bind_ctx(MODELS):
            create_schema(db)
    return db


@contextmanager
def _naming(url: str) -> Iterator[None]:
    """A missing folder, a file in the way, a server down become one DatabaseURLError.

    The config's fault as far as the user can tell: say which URL, not a traceback.
    """
    try:
        yield
    except (OSError, PeeweeException, SchemaError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
        raise DatabaseURLError(f"cannot open {_without_password(url)}: {reason}") from None


def _without_password(url: str) -> str:
    return re.sub(r"(//[^:/@]*):[^@/]*@", r"\1:***@", url)


def _make(url: str, durable: bool) -> Database:
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = SqliteDatabase(
            path,
            timeout=BUSY_TIMEOUT_S,
            check_same_thread=False,
            pragmas={
                "journal_mode": "wal",
                "synchronous": "full" if durable else "normal",
                "foreign_keys": 1,
                "cache_size": -32 * 1024,
                "busy_timeout": BUSY_TIMEOUT_S * 1000,
                "temp_store": "memory",
            },
        )
    elif url.startswith(("postgresql://", "postgres://")):
        db = connect_postgres(url, durable)
    else:
        raise DatabaseURLError(f"unsupported database URL {url!r} (use sqlite:/// or postgresql://)")
    return db


def reset_schema(db: Database) -> None:
    """Drop the index tables and create them empty (for `pacs reindex`).

    The audit trail stays: it cannot be rebuilt from the files.
    """
    drop_schema(db, keep=(AuditEvent,))
    create_schema(db)


def close_database() -> None:
    db = database.obj
    if db is not None and not db.is_closed():
        db.close()


def in_write_transaction(work: Callable[[], T]) -> T:
    """Run `work` in a write transaction; on PostgreSQL retry it when aborted by a concurrent one.

    Several nodes writing the same patient or study rows may deadlock or
    conflict; the server then aborts one transaction, which is safe to run again
    from the start (as PostgreSQL's manual advises for 40001/40P01).
    """
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            with write_transaction():
                return work()
        except (OperationalError, InterfaceError) as exc:
            if attempt == WRITE_ATTEMPTS or sqlstate(exc) not in _RETRYABLE:
                discard_broken_connection()
                raise
            log.info("index transaction aborted by a concurrent one (%s); retry %d",
                     sqlstate(exc), attempt)
            time.sleep(random.uniform(0, 0.01 * attempt))
    raise AssertionError("unreachable")


def stream(query: SelectBase, raw: bool = False) -> Iterator[tuple]:
    """The rows of `query` as tuples, fetched as they are consumed.

    SQLite steps its cursor lazily; with `raw` its rows skip peewee's per-value
    conversion (C-FIND's columns are text, integers and bytes already).
    psycopg2 would fetch the whole result into memory, so on PostgreSQL the
    rows come from a server-side cursor inside a read transaction (500 rows
    per round trip).
    """
    backend = database.obj
    if not isinstance(backend, PostgresqlDatabase):
        yield from (backend.execute(query) if raw else query.tuples().iterator())
        return
    query = query.tuples()
    with backend.atomic():
        cursor = backend.execute(query, named_cursor=True, array_size=STREAM_BATCH)
        try:
            yield from query._get_cursor_wrapper(cursor).iterator()
        finally:  # also when abandoned (C-CANCEL): close it before the transaction ends
            cursor.close()


_writer_locks: dict[str, tuple[int, threading.Lock]] = {}


@contextmanager
def _exclusive(path: str) -> Iterator[None]:
    """Hold an flock on `path` (and a thread lock): waiters wake the moment it is free."""
    if path not in _writer_locks:
        _writer_locks[path] = (os.open(path, os.O_RDWR | os.O_CREAT, 0o644), threading.Lock())
    fd, lock = _writer_locks[path]
    with lock:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


@contextmanager
def write_transaction() -> Iterator[None]:
    """A write transaction that never fails because another process is writing.

    SQLite: a deferred transaction that reads, then writes, fails at once with
    "database is locked" if another process (a second worker, `pacs import`)
    committed in between, and a waiting writer polls with sleeps of up to
    100 ms. Writers therefore queue on a lock file beside the database (woken
    as soon as it is free), then BEGIN IMMEDIATE. PostgreSQL locks rows itself.
    """
    backend = database.obj
    if isinstance(backend, SqliteDatabase) and backend.database != ":memory:":
        with _exclusive(backend.database + "-writer"), backend.atomic(lock_type="IMMEDIATE"):
            yield
    else:
        with backend.atomic():
            yield
