"""The ways to open the database: an engine per URL, a session scope that commits or rolls back, and
Core connections for the stage tasks' hot path."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["connection_scope", "get_engine", "session_scope", "statement_scope"]


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
    # pre_ping lets workers survive a database restart: a dead pooled connection is replaced.
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


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


@contextmanager
def connection_scope(url: str) -> Iterator[Connection]:
    """A Core connection in one transaction: for stage writes of several statements, without the
    set-up of an ORM session (measured: about half the CPU of a session per block)."""
    with get_engine(url).begin() as connection:
        yield connection


@cache
def _autocommit(url: str) -> Engine:
    return get_engine(url).execution_options(isolation_level="AUTOCOMMIT")


@contextmanager
def statement_scope(url: str) -> Iterator[Connection]:
    """A Core connection for blocks of single statements that need no common transaction (a read,
    or one write that is atomic by itself). On Postgres it runs in autocommit, which saves the
    BEGIN and COMMIT round trips; on SQLite it is a transaction like `connection_scope`."""
    if get_engine(url).dialect.name != "postgresql":
        with connection_scope(url) as connection:
            yield connection
        return
    with _autocommit(url).connect() as connection:
        yield connection
