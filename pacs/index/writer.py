"""Write instance records into the index, many per transaction.

One transaction per batch is what makes ingest fast: the disk does one
commit (one fsync of the WAL) for every instance that arrived meanwhile on any
association. Counter deltas and ModalitiesInStudy/SOPClassesInStudy are gathered
in memory during the batch and written once at its end.

Several nodes may write one PostgreSQL index at once, so there every row is
created with INSERT ... ON CONFLICT DO NOTHING and looked up when it was not
ours: two nodes receiving the same patient, study or SOP Instance UID end with
one row, and the loser updates it as a replacement would. A transaction the
server aborts for a deadlock runs again (db.in_write_transaction). SQLite has
one writer at a time (db.write_transaction) and keeps the plain statements.
"""
from __future__ import annotations

import functools
import logging
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from peewee import AutoField, Field, Model, PostgresqlDatabase

from pacs.index.db import in_write_transaction
from pacs.index.models import Instance, Patient, Series, Study, database
from pacs.index.records import InstanceRecord

log = logging.getLogger(__name__)


class _Statements:
    """The statements run per instance, rendered once per backend.

    Building SQL is most of peewee's cost per statement (~0.1 ms); these run for
    every stored instance, or every new parent row (the lookups), so they are
    rendered once (with the backend's placeholder) and executed with fresh
    parameters. Everything else uses peewee's query builder.
    """

    def __init__(self) -> None:
        self.backend = database.obj
        param = self.backend.param
        self.param = param
        self.shared = isinstance(self.backend, PostgresqlDatabase)  # other nodes may write too
        self.columns = [Instance.series] + [
            Instance._meta.fields[name] for name in InstanceRecord.INSTANCE_FIELDS
        ]
        self.insert = self._insert(Instance, self.columns, '("sop_uid")')
        self.find = (f'SELECT "id", "series_id", "path" FROM "{Instance._meta.table_name}" '
                     f'WHERE "sop_uid" = {param}')
        self._lookups: dict[type[Model], str] = {}
        self._creates: dict[type[Model], tuple[str, list[Field]]] = {}

    def lookup(self, model: type[Model], keys: tuple[Field, ...]) -> str:
        """SELECT of the row with given values of `keys` (one parameter each)."""
        sql = self._lookups.get(model)
        if sql is None:
            where = functools.reduce(operator.and_, (field == "" for field in keys))
            sql = self._lookups[model] = model.select().where(where).sql()[0]
        return sql

    def create(self, model: type[Model]) -> tuple[str, list[Field]]:
        """INSERT of a new `model` row, every column but the id a parameter (in this order);
        shared: nothing if another node made it first, else its id."""
        found = self._creates.get(model)
        if found is None:
            fields = [f for f in model._meta.sorted_fields if not isinstance(f, AutoField)]
            found = self._creates[model] = (self._insert(model, fields), fields)
        return found

    def _insert(self, model: type[Model], fields: list[Field], conflict: str = "") -> str:
        """INSERT of `fields` (one parameter each); shared: nothing on a conflict (on the
        `conflict` columns, else any), else the new row's id."""
        names = ", ".join(f'"{field.column_name}"' for field in fields)
        marks = ", ".join([self.param] * len(fields))
        sql = f'INSERT INTO "{model._meta.table_name}" ({names}) VALUES ({marks})'
        if self.shared:
            sql += f' ON CONFLICT {conflict + " " if conflict else ""}DO NOTHING RETURNING "id"'
        return sql

    def increment(self, model: type[Model], field: str) -> str:
        table = model._meta.table_name
        return (f'UPDATE "{table}" SET "{field}" = "{field}" + {self.param} '
                f'WHERE "id" = {self.param}')

    def insert_values(self, series_id: int, values: dict) -> list:
        row = [series_id, *(values[name] for name in InstanceRecord.INSTANCE_FIELDS)]
        return [field.db_value(value) for field, value in zip(self.columns, row)]


_statements: _Statements | None = None


def _sql() -> _Statements:
    """The rendered statements for the database the models are bound to now."""
    global _statements
    if _statements is None or _statements.backend is not database.obj:
        _statements = _Statements()
    return _statements


def add_value(joined: str, value: str) -> str:
    """Add one value to a "\\a\\b\\" multi-value column, keeping it sorted and unique."""
    if not value:
        return joined
    values = set(filter(None, joined.split("\\")))
    if value in values:
        return joined
    values.add(value)
    return "\\" + "\\".join(sorted(values)) + "\\"


class _Rows:
    """Parent rows already looked up, kept across batches by the one writer thread."""

    def __init__(self) -> None:
        self.patients: dict[tuple[str, str], Patient] = {}
        self.studies: dict[str, Study] = {}
        self.studies_by_pk: dict[int, Study] = {}
        self.series: dict[str, Series] = {}
        self.conflicts: set[tuple[int, str, str]] = set()  # (patient pk, field, value) warned of

    def size(self) -> int:
        return len(self.patients) + len(self.studies) + len(self.series) + len(self.conflicts)


class _Batch:
    """One transaction: parent rows (cached), counter deltas and multi-values to apply."""

    def __init__(self, rows: _Rows) -> None:
        self.patients = rows.patients
        self.studies = rows.studies
        self.studies_by_pk = rows.studies_by_pk
        self.series = rows.series
        self.conflicts = rows.conflicts
        self.deltas: dict[type, Counter] = {Patient: Counter(), Study: Counter(), Series: Counter()}
        self.multi: dict[int, tuple[Study, dict[str, set[str]]]] = {}  # study pk -> values added

    def bump(self, model: type, row_id: int, field: str, by: int = 1) -> None:
        self.deltas[model][(row_id, field)] += by

    def patient(self, values: dict) -> Patient:
        key = (values["patient_id"], values["issuer"])
        row = self.patients.get(key)
        if row is None:
            row, _ = _find_or_create(Patient, (Patient.patient_id, Patient.issuer), values)
            self.patients[key] = row
        self.check_conflict(row, values)
        return row

    def check_conflict(self, row: Patient, values: dict) -> None:
        """Warn once per differing name or birth date, also when the row came from the cache."""
        for field in ("patient_name", "birth_date"):
            old, new = getattr(row, field), values[field]
            if new and old != new and (row.id, field, new) not in self.conflicts:
                self.conflicts.add((row.id, field, new))
                log.warning(
                    "patient %r (issuer %r): %s differs: index has %r, new instance has %r; "
                    "stored under the existing patient", row.patient_id, row.issuer, field, old,
                    new,
                )

    def study(self, values: dict, patient: Patient) -> Study:
        row = self.studies.get(values["study_uid"])
        if row is None:
            row, created = _find_or_create(Study, (Study.study_uid,),
                                           {**values, "patient": patient})
            if created:
                self.bump(Patient, patient.id, "num_studies")
            elif row.patient_id != patient.id:
                log.warning(
                    "study %s already filed under patient row %s; keeping it there "
                    "(new instance names patient %r)", row.study_uid, row.patient_id,
                    patient.patient_id,
                )
            self.studies[row.study_uid] = row
            self.studies_by_pk[row.id] = row
        return row

    def series_row(self, values: dict, study: Study) -> Series:
        row = self.series.get(values["series_uid"])
        if row is None:
            row, created = _find_or_create(Series, (Series.series_uid,),
                                           {**values, "study": study})
            if created:
                self.bump(Study, study.id, "num_series")
                self.bump(Patient, study.patient_id, "num_series")
                self.add_multi(study, "modalities", values["modality"])
            self.series[row.series_uid] = row
        return row

    def add_multi(self, study: Study, field: str, value: str) -> None:
        updated = add_value(getattr(study, field), value)
        if updated != getattr(study, field):
            setattr(study, field, updated)
            self.multi.setdefault(study.id, (study, {}))[1].setdefault(field, set()).add(value)

    def count_instance(self, series: Series, by: int) -> None:
        study = self.studies_by_id(series.study_id)
        self.bump(Series, series.id, "num_instances", by)
        self.bump(Study, study.id, "num_instances", by)
        self.bump(Patient, study.patient_id, "num_instances", by)

    def studies_by_id(self, study_id: int) -> Study:
        row = self.studies_by_pk.get(study_id)
        if row is None:
            row = Study.get_by_id(study_id)
            self.studies[row.study_uid] = row
            self.studies_by_pk[row.id] = row
        return row

    def flush(self) -> None:
        sql = _sql()
        updates = [
            (sql.increment(model, field), (delta, row_id))
            for model, counter in self.deltas.items()
            # In id order, so concurrent writers lock shared rows in the same order.
            for (row_id, field), delta in sorted(counter.items()) if delta
        ]
        if sql.shared and updates:
            # One round trip for all of them: psycopg2 sends several statements as one.
            database.execute_sql("; ".join(statement for statement, _ in updates),
                                 [value for _, params in updates for value in params])
        else:
            for statement, params in updates:
                database.execute_sql(statement, params)
        for study, added in self.multi.values():
            # Merge into the stored values, not the cached row's: another process
            # (`pacs import`) may have added some since the row was cached.
            query = Study.select(Study.modalities, Study.sop_classes).where(Study.id == study.id)
            stored = (query.for_update() if database.obj.for_update else query).dicts().get()
            for field in ("modalities", "sop_classes"):
                merged = stored[field]
                for value in sorted(added.get(field, ())):
                    merged = add_value(merged, value)
                setattr(study, field, merged)
            Study.update(modalities=study.modalities, sop_classes=study.sop_classes).where(
                Study.id == study.id
            ).execute()


@dataclass(frozen=True)
class Written:
    """What writing one record did: whether its SOP Instance UID had a row already,
    and the file no row names any more because of it (delete it after the commit)."""

    existed: bool
    unindexed: str | None = None  # the old row's file, or the record's own when kept


class IndexWriter:
    """Writes batches, remembering parent rows so a series' next instance costs one INSERT.

    Only valid while this writer is the index's only writer in the process; the
    cache is dropped whenever a transaction fails (its rows may be rolled back).
    With `keep_existing` (storage.on_duplicate: keep) a SOP Instance UID that has
    a row keeps it as it is.
    """

    MAX_CACHED = 20000

    def __init__(self, keep_existing: bool = False) -> None:
        self._rows = _Rows()
        self._keep_existing = keep_existing

    def write(self, records: Iterable[InstanceRecord]) -> list[Written]:
        """Insert or replace these instances (and their parents) in one transaction."""
        records = list(records)
        if self._rows.size() > self.MAX_CACHED:
            self._rows = _Rows()
        return in_write_transaction(lambda: self._write(records))

    def _write(self, records: list[InstanceRecord]) -> list[Written]:
        try:
            batch = _Batch(self._rows)
            written = [_write_one(batch, record, self._keep_existing) for record in records]
            batch.flush()
        except BaseException:
            self._rows = _Rows()
            raise
        return written


def write_batch(records: Iterable[InstanceRecord]) -> list[Written]:
    """Insert or replace these instances in one transaction, without a row cache."""
    return IndexWriter().write(records)


def _find_or_create(model: type[Model], keys: tuple[Field, ...],
                    values: dict) -> tuple[Model, bool]:
    """The row whose `keys` have the values in `values`, created from `values` if
    missing; True if created here."""
    sql = _sql()
    lookup = sql.lookup(model, keys)
    params = [field.db_value(values[field.name]) for field in keys]
    row = _first(model, lookup, params)
    if row is not None:
        return row, False
    # As Model.create, from SQL rendered once (peewee builds it in ~0.3 ms).
    insert, fields = sql.create(model)
    filled = {field.name: values.get(field.name, field.default) for field in fields}
    cursor = database.execute_sql(insert, [field.db_value(filled[field.name])
                                           for field in fields])
    if not sql.shared:
        return model(id=cursor.lastrowid, **filled), True
    # Another node may be creating it now: the INSERT waits for its commit and
    # then does nothing, and the second look finds its row.
    created = cursor.fetchone()
    if created is not None:
        return model(id=created[0], **filled), True
    return _first(model, lookup, params), False


def _first(model: type[Model], sql: str, params: list) -> Model | None:
    return next(iter(model.raw(sql, *params)), None)


def _find(sql: _Statements, sop_uid: str) -> tuple[int, int, str] | None:
    """(id, series id, file) of the instance row with this SOP Instance UID, if any."""
    return database.execute_sql(sql.find, (sop_uid,)).fetchone()


def _write_one(batch: _Batch, record: InstanceRecord, keep_existing: bool) -> Written:
    sql = _sql()
    path = record.instance["path"]
    # Insert first on PostgreSQL (each statement is a round trip): a new instance,
    # the common case, costs one; a replacement, or another node's row, finds it
    # after. A kept instance is looked up before anything is written for it.
    old = _find(sql, record.sop_uid) if keep_existing or not sql.shared else None
    if old is not None and keep_existing:
        return Written(existed=True, unindexed=None if old[2] == path else path)
    patient = batch.patient(record.patient)
    study = batch.study(record.study, patient)
    series = batch.series_row(record.series, study)
    batch.add_multi(batch.studies_by_id(series.study_id), "sop_classes",
                    record.instance["sop_class_uid"])
    if old is None:
        inserted = database.execute_sql(sql.insert, sql.insert_values(series.id, record.instance))
        if not sql.shared or inserted.fetchone() is not None:
            batch.count_instance(series, 1)
            return Written(existed=False)
        old = _find(sql, record.sop_uid)  # another node's row, inserted meanwhile
    old_id, old_series_id, old_path = old
    if keep_existing:
        return Written(existed=True, unindexed=None if old_path == path else path)
    Instance.update(series=series.id, **record.instance).where(Instance.id == old_id).execute()
    if old_series_id != series.id:
        log.warning("instance %s moved from series row %s to %s", record.sop_uid,
                    old_series_id, series.id)
        batch.count_instance(Series.get_by_id(old_series_id), -1)
        batch.count_instance(series, 1)
    return Written(existed=True, unindexed=None if old_path == path else old_path)
