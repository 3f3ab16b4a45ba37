"""The one way to open a database session: an engine per URL, a session scope that commits or rolls back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["get_engine", "session_scope"]


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
