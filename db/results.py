"""Reading finished work back: outputs in input order, and keyset pages for exports of any size."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from db.models import FINAL_OUTPUT, Item, ItemStatus, Output

__all__ = ["finished_items", "job_outputs"]


def finished_items(
    session: Session, job_id: str, *, after_position: int, limit: int, with_pools: bool
) -> list[tuple[Item, Output | None]]:
    """The next `limit` finished items after `after_position`, in input order, with their outputs
    (and every turn's output, loaded on the item).

    Keyset pages: an export reads a job of any size in constant memory, one page per query.
    """
    query = (
        select(Item, Output)
        .outerjoin(Output, FINAL_OUTPUT)
        .where(Item.job_id == job_id, Item.position > after_position, Item.status != ItemStatus.PENDING)
        .order_by(Item.position)
        .limit(limit)
        .options(selectinload(Item.outputs))
    )
    if with_pools:
        query = query.options(selectinload(Item.candidates))
    return [(item, output) for item, output in session.execute(query).tuples()]


def job_outputs(
    session: Session, job_id: str, *, with_pools: bool = False
) -> Iterable[tuple[Item, Output | None]]:
    """Items of a job in input order with their outputs (None for failed ones); `with_pools` loads
    every item's candidates in the same round of queries instead of one query per item."""
    query = (
        select(Item, Output)
        .outerjoin(Output, FINAL_OUTPUT)
        .where(Item.job_id == job_id)
        .order_by(Item.position)
    )
    if with_pools:
        query = query.options(selectinload(Item.candidates))
    yield from session.execute(query).tuples()
