"""Storing a submitted job: the job row and all its items, in the caller's one transaction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Item, ItemStatus, Job
from db.rows import NewItem, dialect_insert

__all__ = ["insert_job", "job_by_idempotency_key"]


def insert_job(
    session: Session,
    *,
    recipe_name: str,
    recipe: dict[str, Any],
    items: Sequence[NewItem],
    name: str | None,
    priority: int = 0,
    kind: str = "bulk",
    idempotency_key: str | None = None,
    idempotency_digest: str | None = None,
) -> Job:
    """Add a job and all its items to the session's transaction; the caller commits once."""
    job = Job(
        name=name,
        recipe_name=recipe_name,
        recipe=recipe,
        total_items=len(items),
        priority=priority,
        kind=kind,
        idempotency_key=idempotency_key,
        idempotency_digest=idempotency_digest,
    )
    session.add(job)
    session.flush()
    session.execute(
        dialect_insert(session.get_bind().dialect.name, Item),
        [
            {
                "job_id": job.id,
                "position": position,
                "external_id": item.external_id,
                "dataset": item.dataset,
                "instruction": item.instruction,
                "system": item.system,
                "messages": item.messages,
                "turns": item.turns,
                "last_turn": len(item.turns) - 1 if item.turns else 0,
                "status": ItemStatus.PENDING,
            }
            for position, item in enumerate(items)
        ],
    )
    return job


def job_by_idempotency_key(session: Session, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.idempotency_key == key))
