"""The Alembic migrations build exactly the schema the models declare, on SQLite and on Postgres."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from db.migrate import upgrade
from db.models import Base
from db.session import get_engine


def schema_drift(url: str) -> list[object]:
    with get_engine(url).connect() as connection:
        return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))


def test_sqlite_schema_matches_the_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    upgrade(url)  # a second run on an up-to-date database changes nothing
    assert schema_drift(url) == []


def test_postgres_schema_matches_the_models(database_url: str) -> None:
    assert schema_drift(database_url) == []
