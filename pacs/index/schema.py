"""Create the index schema, or upgrade an older one in place (playhouse.migrate).

A new database gets the tables of models.py plus `_extras` and the newest
version number. An existing one is at the version its `schema_version` row
says, and each step of `MIGRATIONS` above it runs in order, in one
transaction with the version update, so an upgrade of `pacs` upgrades the
schema on the first start. A new step: change models.py, append a function
that makes an existing database look like a new one, with the operations of
playhouse.migrate's migrator where they can express the change (columns,
plain indexes: the migrator spells them for either backend), and if it adds
something models.py cannot express, add that to `_extras` as well.
"""
from __future__ import annotations

import logging
from typing import Callable

from peewee import Database, PostgresqlDatabase
from playhouse.migrate import SchemaMigrator, migrate

from pacs.index.models import MODELS, AuditEvent, Patient, SchemaVersion, Study

log = logging.getLogger(__name__)
# Any fixed number: nodes starting at once on a new PostgreSQL database take
# turns creating it (concurrent CREATE TABLE IF NOT EXISTS can fail there).
_SCHEMA_LOCK = 0x70616373
# Columns matched with a literal prefix (`LIKE 'SMI%'`): a locale-collated
# PostgreSQL index cannot serve LIKE, one with varchar_pattern_ops can.


class SchemaError(Exception):
    """The database holds a schema this version of pacs cannot use."""


_PREFIX_COLUMNS = (
    Patient.patient_name, Patient.patient_name_fold, Patient.patient_id,
    Study.accession_number, Study.referring_physician_fold, Study.referring_physician,
)


def _extras(db: Database) -> None:
    """What models.py cannot declare: PostgreSQL indexes for prefix LIKE."""
    if not isinstance(db, PostgresqlDatabase):
        return
    for field in _PREFIX_COLUMNS:
        table, column = field.model._meta.table_name, field.column_name
        db.execute_sql(f'CREATE INDEX IF NOT EXISTS "{table}_{column}_prefix" '
                       f'ON "{table}" ("{column}" varchar_pattern_ops)')


def _v2_prefix_indexes(db: Database, migrator: SchemaMigrator) -> None:
    _extras(db)


def _v3_audit_trail(db: Database, migrator: SchemaMigrator) -> None:
    db.create_tables([AuditEvent])


def _v4_referring_physician_index(db: Database, migrator: SchemaMigrator) -> None:
    """Index Study.referring_physician (and its prefix on PostgreSQL), as patient_name is.

    With `query.case_insensitive_pn: false` a ReferringPhysicianName key is
    matched on this column rather than on its `_fold` twin, and without an
    index each such C-FIND read every study row.
    """
    migrate(migrator.add_index(Study._meta.table_name, (Study.referring_physician.column_name,)))
    _extras(db)


# version -> the step that brings a database of the version before up to it
MIGRATIONS: dict[int, Callable[[Database, SchemaMigrator], None]] = {
    2: _v2_prefix_indexes,
    3: _v3_audit_trail,
    4: _v4_referring_physician_index,
}
LATEST = max(MIGRATIONS)


def create_schema(db: Database) -> None:
    """Create the schema of a new database, or bring an existing one up to LATEST."""
    with db.atomic():
        if isinstance(db, PostgresqlDatabase):
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        if not db.table_exists(SchemaVersion._meta.table_name):
            db.create_tables(MODELS)
            _extras(db)
            SchemaVersion.create(version=LATEST)
            return
        row = SchemaVersion.select().order_by(SchemaVersion.version.desc()).first()
        version = row.version if row else 1
        if version > LATEST:
            raise SchemaError(f"the index has schema version {version}, newer than this pacs "
                               f"({LATEST}); upgrade pacs")
        migrator = SchemaMigrator.from_database(db)
        for step in range(version + 1, LATEST + 1):
            log.info("upgrading the index schema to version %d", step)
            MIGRATIONS[step](db, migrator)
        if version < LATEST:
            SchemaVersion.delete().execute()
            SchemaVersion.create(version=LATEST)


def schema_version(db: Database) -> int:
    """The version recorded in the open database."""
    return SchemaVersion.select().order_by(SchemaVersion.version.desc()).first().version


def drop_schema(db: Database, keep: tuple = ()) -> None:
    """Drop the tables, but those in `keep` (which a new schema then reuses)."""
    with db.atomic():
        db.drop_tables([model for model in MODELS if model not in keep], safe=True)
