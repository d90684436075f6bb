"""PostgreSQL connections: a lost one fails the operation in flight, the next reconnects.

The server is shared, so instead of restarting it the test terminates the
node's own backends (pg_terminate_backend, which is what a restart does to
them), found by the application_name of the test's schema.
"""
from __future__ import annotations

import logging

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import CTImageStorage

from pacs.index.db import close_database, open_database
from pacs.index.models import Instance
from tests.conftest import (
    RunningNode, associate, fresh_database, open_index, run_pacs, stored_path,
    terminate_pg_backends, write_config,
)
from tests.dicomgen import make_instance
from tests.find_support import STUDY_ROOT, find, query


@pytest.fixture
def pg_node(tmp_path):
    with fresh_database("postgresql") as url:
        node = RunningNode(write_config(tmp_path, database={"url": url}))
        try:
            yield node, url.rsplit("application_name=", 1)[1]
        finally:
            node.stop()


def test_lost_connection_fails_the_operation_in_flight_then_reconnects(pg_node, caplog):
    node, schema = pg_node
    first, second, third = (make_instance(number=n) for n in (1, 2, 3))
    assoc = associate(node, contexts=[(CTImageStorage, [ExplicitVRLittleEndian]), STUDY_ROOT])
    assert assoc.send_c_store(first).Status == 0

    assert terminate_pg_backends(schema) >= 1
    with caplog.at_level(logging.WARNING):
        failed = assoc.send_c_store(second)
    assert failed.Status == 0xA700
    assert failed.ErrorComment.startswith("index unavailable")
    assert "index connection lost" in caplog.text
    assert assoc.send_c_store(third).Status == 0  # the same thread, a new connection
    assert assoc.send_c_store(second).Status == 0  # the sender retries: nothing lost

    terminate_pg_backends(schema)
    matches, final = find(assoc, query("IMAGE", StudyInstanceUID=first.StudyInstanceUID,
                                       SeriesInstanceUID=first.SeriesInstanceUID,
                                       SOPInstanceUID=None))
    assert (len(matches), final.Status) == (0, 0xA700)
    matches, final = find(assoc, query("IMAGE", StudyInstanceUID=first.StudyInstanceUID,
                                       SeriesInstanceUID=first.SeriesInstanceUID,
                                       SOPInstanceUID=None))
    assert (len(matches), final.Status) == (3, 0)
    assoc.release()

    node.stop()
    with open_index(node.config_path):
        assert {i.sop_uid for i in Instance.select()} == {
            str(ds.SOPInstanceUID) for ds in (first, second, third)}
    assert all(stored_path(node.config, ds.SOPInstanceUID).is_file()
               for ds in (first, second, third))
    result = run_pacs("verify", "--no-progress", config=node.config_path)
    assert (result.returncode, result.stdout) == (0, "store and index are consistent\n")


@pytest.mark.parametrize("durable, expected", [(True, "on"), (False, "off")])
def test_commits_wait_for_the_wal_flush_only_when_the_store_is_durable(durable, expected):
    with fresh_database("postgresql") as url:
        db = open_database(url, durable=durable)
        try:
            assert db.execute_sql("SHOW synchronous_commit").fetchone() == (expected,)
        finally:
            close_database()
