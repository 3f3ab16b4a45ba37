"""Run Alembic migrations programmatically, so the CLI, the tests and `run` share one code path."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from db.session import get_engine

__all__ = ["alembic_config", "schema_is_current", "upgrade"]

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
