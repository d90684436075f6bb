"""Schema versions: a new index is created at the newest version, an older one upgraded in place."""
from __future__ import annotations

import pytest

from pacs.index.models import SchemaVersion, database
from pacs.index.schema import LATEST, schema_version
from tests.conftest import on_database, open_index, run_pacs, send_datasets, write_config
from tests.dicomgen import make_instance

pytestmark = pytest.mark.both_backends


def prefix_indexes() -> set[str]:
    """The PostgreSQL indexes for prefix LIKE in the open index (none on SQLite)."""
    if database.obj.__class__.__name__.startswith("Sqlite"):
        return set()
    rows = database.execute_sql(
        "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() "
        "AND indexdef LIKE %s", ("%varchar_pattern_ops%",)).fetchall()
    return {row[0] for row in rows}


def test_version_1_index_is_upgraded_on_start_and_keeps_its_rows(make_node, backend):
    node = make_node()
    assert send_datasets(node, [make_instance(patient_id="P1")])[0].Status == 0
    node.stop()
    with open_index(node.config_path):
        assert schema_version(database.obj) == LATEST == 3
        expected = ({"patient_patient_name_prefix", "patient_patient_name_fold_prefix",
                     "patient_patient_id_prefix", "study_accession_number_prefix",
                     "study_referring_physician_fold_prefix"} if backend == "postgresql" else set())
        assert prefix_indexes() == expected
        # What pacs before schema versions left behind: version 1, no prefix
        # indexes, no audit trail.
        for name in expected:
            database.execute_sql(f'DROP INDEX "{name}"')
        database.execute_sql('DROP TABLE "audit_event"')
        SchemaVersion.update(version=1).execute()

    result = run_pacs("stats", config=node.config_path)
    assert result.returncode == 0, result.stderr
    assert "instances: 1" in result.stdout
    with open_index(node.config_path):
        assert schema_version(database.obj) == 3
        assert prefix_indexes() == expected
        assert database.table_exists("audit_event")


def test_index_newer_than_pacs_is_refused_by_name(tmp_path, database_url):
    config = write_config(tmp_path, **on_database(database_url, {}))
    with open_index(config):
        SchemaVersion.update(version=LATEST + 1).execute()
    result = run_pacs("stats", config=config)
    assert result.returncode == 2
    assert f"schema version {LATEST + 1}, newer than this pacs ({LATEST})" in result.stderr
    assert "Traceback" not in result.stderr
