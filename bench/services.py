"""Services of a benchmark run: its own Postgres schema and queue names, this process pointed at them."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text

__all__ = ["isolated_services"]


@contextmanager
def isolated_services(database_url: str, redis_url: str, concurrency: int) -> Iterator[dict[str, str]]:
    """Yield the environment for a worker (DATABASE_URL with a fresh, migrated schema, queue names);
    the Celery app of this process sends there too. The schema is dropped afterwards."""
    from db.migrate import upgrade
    from orchestrator.celery_app import app, configure
    from orchestrator.settings import get_settings

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(database_url)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    suffix = uuid.uuid4().hex[:6]
    separator = "&" if "?" in database_url else "?"
    env = {
        "DATABASE_URL": f"{database_url}{separator}options=-csearch_path%3D{schema}",
        "REDIS_URL": redis_url,
        "QUEUE_CONTROL": f"bench.{suffix}.control",
        "QUEUE_INFERENCE": f"bench.{suffix}.inference",
        "INFERENCE_CONCURRENCY": str(concurrency),
    }
    os.environ.update(env)
    get_settings.cache_clear()
    configure(app, get_settings())
    try:
        upgrade(env["DATABASE_URL"])
        yield env
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
