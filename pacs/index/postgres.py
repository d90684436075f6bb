"""PostgreSQL connections: a pool, handlers that give theirs back, and lost ones recognized.

A DIMSE handler takes a connection from the pool (playhouse.pool) on its first
query and gives it back when it returns (`releasing`): an association does not
pay for a new connection (~10 ms), and a pooled connection is checked when
taken (without a round trip), so one that a server restart killed is replaced
before it can fail an operation. A connection lost while in use fails that
operation; `discard_broken_connection` logs it and drops it, so the next
operation connects afresh. SQLite needs none of this: every function here is
a no-op for it.
"""
from __future__ import annotations

import functools
import inspect
import logging
import select
from typing import Any, Callable, TypeVar

from peewee import PeeweeException, PostgresqlDatabase
from playhouse.db_url import parse
from playhouse.postgres_ext import PooledPostgresqlExtDatabase

from pacs.index.models import database

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 10
RECYCLE_S = 600  # a pooled connection older than this is closed rather than reused
T = TypeVar("T")


class _Postgres(PooledPostgresqlExtDatabase):
    """Pooled PostgreSQL whose commits wait for the WAL flush only when the store is durable.

    With `storage.fsync: false` the files are not fsynced either, so, like
    SQLite's synchronous=NORMAL, a server crash may lose the last commits
    (never corrupt the index); each commit then costs no disk flush.
    """

    def __init__(self, durable: bool, *args: Any, **kwargs: Any):
        # No cap of our own: network.max_associations bounds the handlers.
        super().__init__(*args, max_connections=0, stale_timeout=RECYCLE_S, **kwargs)
        self.durable = durable

    def _is_closed(self, conn) -> bool:
        """Whether a pooled connection is dead, without peewee's SELECT 1 per checkout.

        A server that restarts or terminates a backend sends it a FATAL message and
        closes the socket, so an idle connection with anything to read is dead. (A
        peer that vanished silently would stall a SELECT 1 as well as the real query.)
        """
        if conn.closed or self._adapter.txn_status(conn) != self._adapter.txn_idle:
            return super()._is_closed(conn)  # closed, or rolls back what was left open
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
        return bool(readable)

    def begin(self, isolation_level: Any = None) -> None:
        """Send BEGIN with the transaction's first statement, not as a round trip of its own.

        Each round trip waits for the server process to wake (~0.15 ms measured on
        loopback), and a C-STORE's transaction has only a few statements.
        """
        if isolation_level is None and not self._isolation_level:
            if self.is_closed():  # as BEGIN's cursor would: connecting later resets the state
                self.connect()
            self._state.begin_pending = True
        else:
            super().begin(isolation_level)

    def _execute_cursor(self, sql: str, params: Any, **cursor_options: Any) -> Any:
        if self._take_pending_begin():
            if cursor_options.get("named_cursor"):  # psycopg2 wraps it in DECLARE
                super().begin()
            else:
                sql = "BEGIN; " + sql  # psycopg2 sends both at once; its result is the last's
        return super()._execute_cursor(sql, params, **cursor_options)

    def commit(self) -> None:
        if not self._take_pending_begin():  # else nothing ran: nothing to commit
            super().commit()

    def rollback(self) -> None:
        if not self._take_pending_begin():
            super().rollback()

    def _take_pending_begin(self) -> bool:
        pending = getattr(self._state, "begin_pending", False)
        self._state.begin_pending = False
        return pending

    def _initialize_connection(self, conn) -> None:
        if not self.durable:
            with conn.cursor() as cursor:
                cursor.execute("SET synchronous_commit TO off")


def connect_postgres(url: str, durable: bool) -> PooledPostgresqlExtDatabase:
    """The pooled database at a postgresql:// URL (its query parameters go to psycopg2)."""
    params = parse(url)
    params.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    return _Postgres(durable, **params)


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of the driver error peewee wrapped (its first argument)."""
    for candidate in (exc, *exc.args[:1], exc.__cause__, exc.__context__):
        code = getattr(candidate, "pgcode", None) or getattr(candidate, "sqlstate", None)
        if code:
            return code
    return None


def release_connection() -> None:
    """Give this thread's PostgreSQL connection back to the pool (SQLite keeps its own)."""
    db = database.obj
    if isinstance(db, _Postgres) and not db.is_closed() and not db.in_transaction():
        db.close()


def releasing(handler: Callable[..., T]) -> Callable[..., T]:
    """`handler` (a function or a generator function) releasing the connection when done.

    Handlers run on pynetdicom's association threads; a connection per thread
    would be opened anew for every association (~10 ms on PostgreSQL).
    """
    if inspect.isgeneratorfunction(handler):
        @functools.wraps(handler)
        def generator(*args: Any, **kwargs: Any) -> Any:
            try:
                return (yield from handler(*args, **kwargs))
            finally:
                release_connection()
        return generator

    @functools.wraps(handler)
    def function(*args: Any, **kwargs: Any) -> T:
        try:
            return handler(*args, **kwargs)
        finally:
            release_connection()
    return function


def discard_broken_connection() -> bool:
    """After an index error: drop this thread's connection if the server closed it.

    The next operation then connects afresh (PostgreSQL restarted, the backend
    was terminated); a connection that is merely idle is kept. True if dropped.
    """
    db = database.obj
    if not isinstance(db, PostgresqlDatabase) or db.is_closed() or db.in_transaction():
        return False
    if not getattr(db._state.conn, "closed", False) and db.is_connection_usable():
        return False
    log.warning("index connection lost; the next operation reconnects")
    try:
        db.close()
    except PeeweeException:
        pass
    db._state.reset()
    return True
