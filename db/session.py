"""The ways to open the database: an engine per URL, a session scope that commits or rolls back, and
the stage tasks' connection for their few hot statements."""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from functools import cache
from typing import Any, NamedTuple, cast

import psycopg
from sqlalchemy import Connection, Dialect, Engine, Executable, create_engine, event
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

__all__ = ["DATABASE_UNAVAILABLE", "StageConnection", "get_engine", "session_scope", "statement_scope"]

# What a database that is restarting, unreachable or out of connections raises: SQLAlchemy's wrappers,
# and the driver's own errors where a connection is opened outside SQLAlchemy's wrapping.
DATABASE_UNAVAILABLE = (OperationalError, InterfaceError, psycopg.OperationalError, psycopg.InterfaceError)


@cache
def get_engine(url: str) -> Engine:
    """One pooled engine per URL and process; SQLite gets WAL and a busy timeout for concurrent stages."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()
            # Let SQLAlchemy issue BEGIN itself (below) instead of pysqlite's deferred one.
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _sqlite_begin_immediate(connection: Any) -> None:
            # Take the write lock up front: two deferred transactions upgrading at once deadlock,
            # and SQLite answers that with "database is locked" instead of waiting.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    engine = create_engine(url, pool_size=10, max_overflow=20)
    _replace_dead_connections(engine)
    return engine


# A pooled connection idle for longer than this is pinged before use (a firewall or the server may
# have dropped it quietly). One used more recently is only checked for a goodbye from the server,
# which costs no round trip: a ping on every checkout was a third of a stage's database round
# trips, and in a worker's threads pool every round trip also waits for the GIL again.
PING_AFTER_IDLE_S = 10.0


def _check_alive(dbapi_connection: Any, idle_since: float, dialect: Dialect) -> None:
    """Raise DisconnectionError for a connection the server has closed, or (after a long idle
    time) one that does not answer a ping. A connection used recently costs no round trip."""
    # An idle connection has nothing to read unless the server said goodbye (a restart sends
    # "terminating connection" and closes the socket).
    poller = select.poll()
    poller.register(dbapi_connection.fileno(), select.POLLIN)
    if poller.poll(0):
        raise DisconnectionError("the server closed the connection")
    if time.monotonic() - idle_since > PING_AFTER_IDLE_S:
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as exc:  # whatever the driver raises for a dead connection
            raise DisconnectionError(f"ping failed: {exc}") from exc


def _replace_dead_connections(engine: Engine) -> None:
    """Let processes survive a database restart: a pooled connection that the server closed, or
    that does not answer a ping after a long idle time, is replaced before anyone uses it. (A
    statement that is running when the server goes away fails; the stages retry such errors.)"""

    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _check(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.pop("idle_since", None)
        if idle_since is not None:  # not a new connection
            _check_alive(dbapi_connection, idle_since, engine.dialect)


@cache
def _factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session in one transaction: committed when the block ends, rolled back if it raises."""
    session = _factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


class _Compiled(NamedTuple):
    sql: str
    # Values of the statement's own literals, by parameter name.
    literals: dict[str, Any]
    # Bind processors of its parameters (JSON serialisation, for one), by parameter name.
    processors: tuple[tuple[str, Callable[[Any], Any]], ...]


@cache
def _compiled(statement: ClauseElement, dialect: Dialect) -> _Compiled:
    compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
    if any(bind.expanding for bind in compiled.bind_names) or compiled.escaped_bind_names:
        raise ValueError("stage statements take plain named parameters (no expanding IN lists)")
    literals: dict[str, Any] = {}
    processors: list[tuple[str, Callable[[Any], Any]]] = []
    for bind, name in compiled.bind_names.items():
        if not bind.required:
            literals[name] = bind.effective_value
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            processors.append((name, process))
    return _Compiled(compiled.string, literals, tuple(processors))


class StageConnection:
    """A connection for a stage task's statements, each of them atomic by itself.

    Stage tasks are the hot path: a worker runs thousands a minute in one process whose threads
    share one GIL. With psycopg each statement, compiled once per process, goes straight to the
    driver in autocommit: no BEGIN/COMMIT round trips, and none of SQLAlchemy's per-execution work
    (connection wrapper, execution context, result objects), which cost about twice the driver's
    own CPU for these one-row statements. Elsewhere (SQLite: the embedded mode) the statements run
    through a Core connection in one transaction. Statements are prebuilt, without expanding IN
    lists; rows come back as tuples without result processing (the stages read integers, text and
    JSON, which the driver decodes).
    """

    def __init__(
        self,
        dialect: Dialect,
        *,
        connection: Connection | None = None,
        held: _HeldConnection | None = None,
    ):
        self.dialect = dialect
        self._connection = connection
        self._held = held

    def rows(self, statement: Executable, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Run one prebuilt statement; returns its rows (none for a statement without RETURNING)."""
        if self._connection is not None:
            result = self._connection.execute(statement, dict(params))
            return [tuple(row) for row in result] if result.returns_rows else []
        assert self._held is not None
        compiled = _compiled(cast(ClauseElement, statement), self.dialect)
        values = compiled.literals | dict(params)
        for name, process in compiled.processors:
            values[name] = process(values[name])
        driver = self._held.driver
        try:
            cursor = driver.execute(compiled.sql, values)
            return cursor.fetchall() if cursor.pgresult.nfields else []
        except self.dialect.loaded_dbapi.Error as exc:
            # Raised as SQLAlchemy's exceptions, which the stages retry (DATABASE_RETRY); a dead
            # connection is dropped and the next statement opens a new one.
            invalidated = self.dialect.is_disconnect(exc, driver, None)
            if invalidated:
                self._held.discard()
            raise DBAPIError.instance(
                compiled.sql,
                values,
                exc,
                self.dialect.loaded_dbapi.Error,
                connection_invalidated=invalidated,
                dialect=self.dialect,
            ) from exc


class _HeldConnection:
    """An autocommit connection for stage statements, kept by `_StageConnections` between uses.

    A stage opens its connection twice (before and after generating) and a worker runs thousands
    of stages a minute: a pool checkout and checkin each time (events, bookkeeping, the reset on
    return) cost more CPU than the statement itself, so these connections skip the pool and are
    checked like a pooled one before every use.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._connection: Any = None
        self._idle_since = 0.0

    @property
    def driver(self) -> Any:
        return self._connection

    def acquire(self) -> None:
        """Make sure there is a live connection: check the one kept, or open one."""
        if self._connection is not None:
            try:
                _check_alive(self._connection, self._idle_since, self._engine.dialect)
            except DisconnectionError:
                self.discard()
        if self._connection is None:
            pooled = self._engine.raw_connection()
            connection: Any = pooled.driver_connection
            # Out of the pool's count: the pool stays free for sessions.
            pooled.detach()
            connection.autocommit = True
            self._connection = connection

    def release(self) -> None:
        self._idle_since = time.monotonic()

    def discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            # Already broken: closing it is only tidying up.
            with suppress(Exception):
                connection.close()


# Stage connections a process keeps open at most. A worker runs as many stage threads as its engines
# batch requests (a hundred or more), each touching the database for a few milliseconds before and
# after a generation of seconds: a few connections serve them all, and Postgres' max_connections
# stays free for the other processes.
STAGE_CONNECTIONS = 8


class _StageConnections:
    """The process's stage connections to one database: at most STAGE_CONNECTIONS, the most recently
    used handed out first; a thread waits for one when all are in use."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._slots = threading.BoundedSemaphore(STAGE_CONNECTIONS)
        self._idle: list[_HeldConnection] = []
        self._lock = threading.Lock()

    @contextmanager
    def checkout(self) -> Iterator[_HeldConnection]:
        with self._slots:
            with self._lock:
                held = self._idle.pop() if self._idle else _HeldConnection(self._engine)
            try:
                held.acquire()
                yield held
            finally:
                held.release()
                with self._lock:
                    self._idle.append(held)


@cache
def _stage_connections(engine: Engine) -> _StageConnections:
    return _StageConnections(engine)


@contextmanager
def statement_scope(url: str) -> Iterator[StageConnection]:
    """A connection for a stage's statements, each atomic by itself (see `StageConnection`)."""
    engine = get_engine(url)
    if engine.dialect.driver != "psycopg":
        with engine.begin() as connection:
            yield StageConnection(engine.dialect, connection=connection)
        return
    with _stage_connections(engine).checkout() as held:
        yield StageConnection(engine.dialect, held=held)
