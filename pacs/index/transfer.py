"""Copy a whole index into another database (`pacs migrate`), e.g. SQLite to PostgreSQL.

Rows keep their ids, so the foreign keys stay valid, and go in one
transaction: an interrupted copy leaves the target empty, never half-filled.
A site thus moves to another backend without re-sending or re-reading images.
"""
from __future__ import annotations

import datetime
from itertools import islice
from typing import Iterator

from peewee import Database, PostgresqlDatabase
from tqdm import tqdm

from pacs.index.db import stream
from pacs.index.models import MODELS, AuditEvent, Instance, Patient, Series, Study

TABLES = (Patient, Study, Series, Instance, AuditEvent)  # parents first; the audit trail too
_MAX_PARAMS = 999  # per INSERT: what every SQLite build accepts


class TargetNotEmpty(Exception):
    """The target index already holds rows; copying would mix two archives."""


def copy_index(target: Database, progress: bool = True) -> dict[str, int]:
    """Copy every row of the index the models are bound to into `target`; rows per table.

    `target` must have the schema (db.open_unbound) and no rows.
    """
    with target.bind_ctx(MODELS):
        if any(model.select().exists() for model in TABLES):
            raise TargetNotEmpty("the target index is not empty")
    totals = {model: model.select().count() for model in TABLES}
    with tqdm(total=sum(totals.values()), unit="row", desc="migrate", disable=not progress) as bar:
        with target.atomic():
            for model in TABLES:
                for count in _copy_table(target, model):
                    bar.update(count)
            if isinstance(target, PostgresqlDatabase):
                continue_ids(target)
    return {model._meta.table_name: total for model, total in totals.items()}


def _copy_table(target: Database, model: type) -> Iterator[int]:
    """Insert the model's rows into `target` in multi-row INSERTs; yield each one's row count."""
    fields = model._meta.sorted_fields
    columns = ", ".join(f'"{field.column_name}"' for field in fields)
    per_insert = max(1, _MAX_PARAMS // len(fields))
    row_marks = "(" + ", ".join([target.param] * len(fields)) + ")"
    rows = stream(model.select(*fields).order_by(model.id))
    while chunk := list(islice(rows, per_insert)):
        sql = (f'INSERT INTO "{model._meta.table_name}" ({columns}) VALUES '
               + ", ".join([row_marks] * len(chunk)))
        target.execute_sql(sql, [_portable(value) for row in chunk for value in row])
        yield len(chunk)


def _portable(value: object) -> object:
    """A value either driver takes: bytes for BYTEA/BLOB, text for a timestamp."""
    if isinstance(value, memoryview):
        return value.tobytes()
    if isinstance(value, datetime.datetime):
        return value.isoformat(" ")  # how peewee stores it in SQLite; PostgreSQL parses it
    return value


def continue_ids(target: Database) -> None:
    """Move each PostgreSQL id sequence past the ids rows were inserted with, so new rows
    do not collide with them."""
    for model in TABLES:
        table = model._meta.table_name
        target.execute_sql(
            f"SELECT setval(pg_get_serial_sequence(%s, 'id'), COALESCE(MAX(\"id\"), 0) + 1, "
            f'false) FROM "{table}"', (f'"{table}"',))

