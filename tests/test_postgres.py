"""PostgreSQL connections and transactions: a lost connection fails the operation in flight,
the next reconnects; a transaction aborted for a deadlock runs again.

The server is shared, so instead of restarting it the tests terminate the
node's own backends (pg_terminate_backend, which is what a restart does to
them), found by the application_name of the test's schema. Between
operations the pool replaces a dead connection unnoticed; during one, the
operation fails (C-STORE and C-FIND 0xA700, C-MOVE/C-GET 0xA701) and the
next one succeeds.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import pytest
from peewee import OperationalError
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import CTImageStorage

from pacs.index.db import close_database, in_write_transaction, open_database
from pacs.index.models import Instance, Patient, database
from tests.conftest import (
    RunningNode, associate, fresh_database, open_index, pg_admin, run_pacs, send_datasets,
    terminate_pg_backends, write_config,
)
from tests.dicomgen import make_instance
from tests.find_support import STUDY_ROOT, find, query
from tests.retrieve_support import Receiver, counts, identifier

T = TypeVar("T")


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


def lose_connection_during(schema: str, table: str, operation: Callable[[], T]) -> T:
    """Run `operation` in a thread while `table` is locked; once the node's query waits on
    the lock, terminate the node's connections under it. The operation's result."""
    admin, watcher = pg_admin(), pg_admin()
    admin.autocommit = False
    try:
        admin.cursor().execute(f'SET search_path TO "{schema}"; '
                               f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(operation)
            deadline = time.monotonic() + 30
            while not blocked_on_a_lock(schema, watcher):
                assert time.monotonic() < deadline and not running.done(), \
                    "the operation never waited"
                time.sleep(0.02)
            assert terminate_pg_backends(schema, watcher) >= 1
            admin.rollback()
            return running.result(timeout=30)
    finally:
        admin.close()
        watcher.close()


def assert_index_unavailable(status: Dataset, code: int, caplog) -> None:
    assert status.Status == code
    assert status.ErrorComment.startswith("index unavailable")
    assert "index connection lost" in caplog.text


def test_lost_connection_fails_the_operation_in_flight_then_reconnects(pg_node, caplog):
    node, schema = pg_node
    first, second, third = (make_instance(number=n) for n in (1, 2, 3))
    assoc = associate(node, contexts=[(CTImageStorage, [ExplicitVRLittleEndian]), STUDY_ROOT])
    assert assoc.send_c_store(first).Status == 0

    # Between operations (a restart while idle): the pool replaces the dead connection.
    assert terminate_pg_backends(schema) >= 1
    assert assoc.send_c_store(second).Status == 0

    # During one: the C-STORE waits inside its transaction when the connection goes.
    with caplog.at_level(logging.WARNING):
        failed = lose_connection_during(schema, "instance", lambda: assoc.send_c_store(third))
    assert_index_unavailable(failed, 0xA700, caplog)

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


def test_lost_connection_fails_a_find_in_flight_then_reconnects(pg_node, caplog):
    node, schema = pg_node
    stored = make_instance()
    assert send_datasets(node, [stored])[0].Status == 0
    assoc = associate(node, contexts=[STUDY_ROOT])
    study = query("STUDY", StudyInstanceUID=stored.StudyInstanceUID, PatientName=None)

    with caplog.at_level(logging.WARNING):
        matches, final = lose_connection_during(schema, "study", lambda: find(assoc, study))
    assert matches == []
    assert_index_unavailable(final, 0xA700, caplog)

    matches, final = find(assoc, study)  # the same association, a new connection
    assert (final.Status, [str(m.StudyInstanceUID) for m in matches]) == (
        0, [stored.StudyInstanceUID])
    assoc.release()


def test_lost_connection_fails_a_get_in_flight_with_a701_then_reconnects(pg_node, caplog):
    """The retrieve services' Out of Resources is "unable to calculate number of matches"
    (PS3.4 C.4.2.1.4 / C.4.3.1.4): the index could not say what to send."""
    node, schema = pg_node
    stored = make_instance()
    assert send_datasets(node, [stored])[0].Status == 0
    study = identifier("STUDY", StudyInstanceUID=stored.StudyInstanceUID)
    receiver = Receiver()

    with caplog.at_level(logging.WARNING):
        pending, final, _ = lose_connection_during(schema, "instance",
                                                   lambda: receiver.get(node, study))
    assert (pending, receiver.received) == ([], {})
    assert_index_unavailable(final, 0xA701, caplog)

    _, final, _ = receiver.get(node, study)
    assert (final.Status, counts(final)) == (0, (1, 0, 0))
    assert set(receiver.received) == {str(stored.SOPInstanceUID)}


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
