"""Run Alembic migrations programmatically, so the CLI, the tests and `run` share one code path; and
the private, migrated schemas that tests and benchmarks run in."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

from db.session import get_engine

__all__ = ["alembic_config", "private_schema", "schema_is_current", "upgrade"]

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # Alembic's config is an ini parser: a literal % in the URL must be doubled.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema at `url` up to `revision`; safe to run on an up-to-date database."""
    command.upgrade(alembic_config(url), revision)


def schema_is_current(url: str) -> bool:
    """Whether the database at `url` is migrated to the newest revision."""
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    with get_engine(url).connect() as connection:
        return bool(MigrationContext.configure(connection).get_current_revision() == head)


@contextmanager
def private_schema(database_url: str, prefix: str, *, migrated: bool = True) -> Iterator[str]:
    """A new schema in the database at `database_url`, as a URL whose search path is that schema:
    runs that share one database (tests, benchmarks) never see each other's rows. Migrated unless told
    not to; dropped with everything in it on exit."""
    base = database_url.partition("options=")[0].rstrip("?&")
    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base)
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        try:
            url = f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"
            if migrated:
                upgrade(url)
            yield url
        finally:
            with admin.begin() as connection:
                connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()
