"""Schema versions: a new index is created at the newest version, an older one upgraded in place."""
from __future__ import annotations

import pytest
from pydicom import Dataset

from pacs.index.levels import STUDY_ROOT
from pacs.index.models import SchemaVersion, Study, database
from pacs.index.query import Find, QueryOptions
from pacs.index.schema import LATEST, schema_version
from tests.conftest import on_database, open_index, run_pacs, send_datasets, write_config
from tests.dicomgen import make_instance

pytestmark = pytest.mark.both_backends


def is_sqlite() -> bool:
    return database.obj.__class__.__name__.startswith("Sqlite")


def prefix_indexes() -> set[str]:
    """The PostgreSQL indexes for prefix LIKE in the open index (none on SQLite)."""
    if is_sqlite():
        return set()
    rows = database.execute_sql(
        "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() "
        "AND indexdef LIKE %s", ("%varchar_pattern_ops%",)).fetchall()
    return {row[0] for row in rows}


def study_indexes() -> dict[str, list[str]]:
    return {index.name: index.columns for index in database.get_indexes("study")}


def referring_physician_plan(value: str) -> str:
    """The plan of a STUDY level C-FIND by ReferringPhysicianName, matched case-sensitively.

    PostgreSQL may scan a one-row table whatever its indexes: sequential scans are off.
    """
    identifier = Dataset()
    identifier.QueryRetrieveLevel, identifier.ReferringPhysicianName = "STUDY", value
    sql, params = Find(identifier, STUDY_ROOT, QueryOptions("MINIPACS", False)).select().sql()
    with database.atomic():
        if is_sqlite():
            rows = database.execute_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall()
        else:
            database.execute_sql("SET LOCAL enable_seqscan = off")
            rows = database.execute_sql("EXPLAIN " + sql, params).fetchall()
    return "\n".join(str(row) for row in rows)


def test_version_1_index_is_upgraded_on_start_and_keeps_its_rows(make_node, backend):
    node = make_node()
    assert send_datasets(node, [make_instance(patient_id="P1")])[0].Status == 0
    node.stop()
    with open_index(node.config_path):
        assert schema_version(database.obj) == LATEST == 4
        expected = ({"patient_patient_name_prefix", "patient_patient_name_fold_prefix",
                     "patient_patient_id_prefix", "study_accession_number_prefix",
                     "study_referring_physician_fold_prefix",
                     "study_referring_physician_prefix"} if backend == "postgresql" else set())
        assert prefix_indexes() == expected
        assert study_indexes()["study_referring_physician"] == ["referring_physician"]
        # What pacs before schema versions left behind: version 1, no prefix
        # indexes, no audit trail, no index on referring_physician.
        for name in expected | {"study_referring_physician"}:
            database.execute_sql(f'DROP INDEX "{name}"')
        database.execute_sql('DROP TABLE "audit_event"')
        SchemaVersion.update(version=1).execute()
        assert "study_referring_physician" not in referring_physician_plan("REF^DOC")

    result = run_pacs("stats", config=node.config_path)
    assert result.returncode == 0, result.stderr
    assert "instances: 1" in result.stdout
    with open_index(node.config_path):
        assert schema_version(database.obj) == 4
        assert prefix_indexes() == expected
        assert database.table_exists("audit_event")
        # Version 4, made by playhouse.migrate's add_index: the C-FIND uses it.
        assert study_indexes()["study_referring_physician"] == ["referring_physician"]
        assert [s.referring_physician for s in Study.select()] == ["REF^DOC"]
        assert "study_referring_physician" in referring_physician_plan("REF^DOC")
        assert "study_referring_physician" in referring_physician_plan("REF*")


def test_index_newer_than_pacs_is_refused_by_name(tmp_path, database_url):
    config = write_config(tmp_path, **on_database(database_url, {}))
    with open_index(config):
        SchemaVersion.update(version=LATEST + 1).execute()
    result = run_pacs("stats", config=config)
    assert result.returncode == 2
    assert f"schema version {LATEST + 1}, newer than this pacs ({LATEST})" in result.stderr
    assert "Traceback" not in result.stderr
