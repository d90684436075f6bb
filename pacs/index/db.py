"""Open the index database named by `database.url` (peewee: SQLite or PostgreSQL).

SQLite runs in WAL mode so queries never wait for ingest, with
`synchronous=FULL` when the store is durable (each group commit survives a
power cut) and a busy timeout so a second process waits instead of failing.
"""
from __future__ import annotations

from pathlib import Path

from peewee import Database, PostgresqlDatabase, SqliteDatabase
from playhouse.db_url import parse

from pacs.index.models import MODELS, SCHEMA_VERSION, SchemaVersion, database

BUSY_TIMEOUT_S = 10


class DatabaseURLError(ValueError):
    """`database.url` names no backend we support."""


def open_database(url: str, durable: bool = True) -> Database:
    """Connect the models to the database at `url` and create the schema if new."""
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
    create_schema(db)
    return db


def create_schema(db: Database) -> None:
    """Create the tables that are missing and record the schema version."""
    with db.atomic():
        db.create_tables(MODELS, safe=True)
        if not SchemaVersion.select().exists():
            SchemaVersion.create(version=SCHEMA_VERSION)


def reset_schema(db: Database) -> None:
    """Drop every table and create them empty (for `pacs reindex`)."""
    with db.atomic():
        db.drop_tables(MODELS, safe=True)
    create_schema(db)


def close_database() -> None:
    db = database.obj
    if db is not None and not db.is_closed():
        db.close()
