"""PostgreSQL connections and transactions: a lost connection fails the operation in flight,
the next reconnects; a transaction aborted for a deadlock runs again.

The server is shared, so instead of restarting it the test terminates the
node's own backends (pg_terminate_backend, which is what a restart does to
them), found by the application_name of the test's schema. Between
operations the pool replaces a dead connection unnoticed; during one, the
operation fails with 0xA700 and the next one succeeds.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from peewee import OperationalError
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import CTImageStorage

from pacs.index.db import close_database, in_write_transaction, open_database
from pacs.index.models import Instance, Patient, database
from tests.conftest import (
    RunningNode, associate, fresh_database, open_index, pg_admin, run_pacs,
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


def blocked_on_a_lock(schema: str, admin) -> bool:
    cursor = admin.cursor()
    cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                   "AND wait_event_type = 'Lock'", (schema,))
    return cursor.fetchone()[0] > 0


def test_lost_connection_fails_the_operation_in_flight_then_reconnects(pg_node, caplog):
    node, schema = pg_node
    first, second, third = (make_instance(number=n) for n in (1, 2, 3))
    assoc = associate(node, contexts=[(CTImageStorage, [ExplicitVRLittleEndian]), STUDY_ROOT])
    assert assoc.send_c_store(first).Status == 0

    # Between operations (a restart while idle): the pool replaces the dead connection.
    assert terminate_pg_backends(schema) >= 1
    assert assoc.send_c_store(second).Status == 0

    # During one: hold the instance table so the C-STORE waits inside its
    # transaction, then kill the node's connections under it.
    admin, watcher = pg_admin(), pg_admin()
    admin.autocommit = False
    admin.cursor().execute(f'SET search_path TO "{schema}"; '
                           'LOCK TABLE "instance" IN ACCESS EXCLUSIVE MODE')
    with ThreadPoolExecutor(1) as pool, caplog.at_level(logging.WARNING):
        running = pool.submit(assoc.send_c_store, third)
        deadline = time.monotonic() + 30
        while not blocked_on_a_lock(schema, watcher):
            assert time.monotonic() < deadline and not running.done(), "the C-STORE never waited"
            time.sleep(0.02)
        assert terminate_pg_backends(schema, watcher) >= 1
        admin.rollback()
        failed = running.result(timeout=30)
    admin.close()
    watcher.close()
    assert failed.Status == 0xA700
    assert failed.ErrorComment.startswith("index unavailable")
    assert "index connection lost" in caplog.text

    assert assoc.send_c_store(third).Status == 0  # the sender retries: nothing lost
    matches, final = find(assoc, query("IMAGE", StudyInstanceUID=first.StudyInstanceUID,
                                       SeriesInstanceUID=first.SeriesInstanceUID,
                                       SOPInstanceUID=None))
    assert (len(matches), final.Status) == (3, 0)
    assoc.release()

    node.stop()
    with open_index(node.config_path):
        assert {i.sop_uid for i in Instance.select()} == {
            str(ds.SOPInstanceUID) for ds in (first, second, third)}
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


def test_transaction_aborted_for_a_deadlock_runs_again():
    """The server's own 40P01 (raised by PL/pgSQL, as its deadlock detector would) is retried."""
    attempts = []

    def work() -> str:
        attempts.append(1)
        Patient.create(patient_id=f"try{len(attempts)}")
        if len(attempts) == 1:
            database.execute_sql("DO $$ BEGIN RAISE EXCEPTION 'deadlock' "
                                 "USING ERRCODE = '40P01'; END $$")
        return "done"

    with fresh_database("postgresql") as url:
        open_database(url)
        try:
            assert in_write_transaction(work) == "done"
            assert len(attempts) == 2
            assert [p.patient_id for p in Patient.select()] == ["try2"]  # the first rolled back
            with pytest.raises(OperationalError):  # any other failure is not retried
                in_write_transaction(lambda: database.execute_sql(
                    "DO $$ BEGIN RAISE EXCEPTION 'no' USING ERRCODE = '57014'; END $$"))
        finally:
            close_database()
