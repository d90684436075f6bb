"""Open the index database named by `database.url` (peewee: SQLite or PostgreSQL).

SQLite runs in WAL mode so queries never wait for ingest, with
`synchronous=FULL` when the store is durable (each group commit survives a
power cut) and a busy timeout so a second process waits instead of failing.
"""
from __future__ import annotations

import fcntl
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from peewee import Database, PeeweeException, PostgresqlDatabase, SqliteDatabase
from playhouse.db_url import parse

from pacs.index.models import MODELS, SCHEMA_VERSION, AuditEvent, SchemaVersion, database

BUSY_TIMEOUT_S = 10


class DatabaseURLError(ValueError):
    """`database.url` names no backend we support, or a database we cannot open."""


def open_database(url: str, durable: bool = True) -> Database:
    """Connect the models to the database at `url` and create the schema if new."""
    try:
        db = _connect(url, durable)
        create_schema(db)
    except (OSError, PeeweeException) as exc:
        # A missing folder, a file in the way, a server down: the config's fault
        # as far as the user can tell, so say which URL rather than a traceback.
        reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
        raise DatabaseURLError(f"cannot open {_without_password(url)}: {reason}") from None
    return db


def _without_password(url: str) -> str:
    return re.sub(r"(//[^:/@]*):[^@/]*@", r"\1:***@", url)


def _connect(url: str, durable: bool) -> Database:
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
        db = PostgresqlDatabase(**parse(url))
    else:
        raise DatabaseURLError(f"unsupported database URL {url!r} (use sqlite:/// or postgresql://)")
    database.initialize(db)
    db.connect(reuse_if_open=True)
    return db


def create_schema(db: Database) -> None:
    """Create the tables that are missing and record the schema version."""
    with db.atomic():
        db.create_tables(MODELS, safe=True)
        if not SchemaVersion.select().exists():
            SchemaVersion.create(version=SCHEMA_VERSION)


def reset_schema(db: Database) -> None:
    """Drop the index tables and create them empty (for `pacs reindex`).

    The audit trail stays: it cannot be rebuilt from the files.
    """
    with db.atomic():
        db.drop_tables([model for model in MODELS if model is not AuditEvent], safe=True)
    create_schema(db)


def close_database() -> None:
    db = database.obj
    if db is not None and not db.is_closed():
        db.close()


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
