"""Result serialisers: one function per export format, each yielding text lines of a job's finished items.

The API streams them and `slimmoa run` writes them to files. Items are read in keyset pages, so a job
of any size is exported in constant memory, and a job that is still running exports what has finished.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Iterator
from typing import Any

from db import queries
from db.models import Item, Output
from db.session import session_scope

__all__ = ["ExportFormat", "alpaca_eval_lines", "export_lines", "jsonl_lines", "pools_lines"]

# Items per query: a page of 500 items with pools of a few candidates is a few MB at most.
PAGE_SIZE = 500

Rows = Iterator[tuple[Item, Output | None]]


class ExportFormat(enum.StrEnum):
    ALPACA_EVAL = "alpaca_eval"  # one JSON list: instruction, output, generator, dataset
    JSONL = "jsonl"  # one object a line: id plus the AlpacaEval fields
    POOLS = "pools"  # one object a line: the item, its whole candidate pool, status and output


def _dump(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False)


def _answer(item: Item, output: Output, generator: str) -> dict[str, Any]:
    return {
        "id": item.external_id or str(item.position),
        "instruction": item.instruction,
        "output": output.text,
        "generator": generator,
        "dataset": item.dataset or "",
    }


def jsonl_lines(rows: Rows, generator: str) -> Iterator[str]:
    """One JSON object a line per item with an output (failed items have none)."""
    for item, output in rows:
        if output is not None:
            yield _dump(_answer(item, output, generator)) + "\n"


def alpaca_eval_lines(rows: Rows, generator: str) -> Iterator[str]:
    """AlpacaEval's model-outputs file: a JSON list, one element a line."""
    yield "["
    separator = "\n"
    for line in jsonl_lines(rows, generator):
        yield separator + line.rstrip("\n")
        separator = ",\n"
    yield "\n]\n"


def pools_lines(rows: Rows, generator: str = "") -> Iterator[str]:
    """Every finished item with its whole candidate pool (per layer and slot), its status and output."""
    for item, output in rows:
        pool = [
            {"layer": c.layer, "slot": c.slot, "model": c.model, "text": c.text, "error": c.error}
            for c in item.candidates
        ]
        record = {
            "id": item.external_id or str(item.position),
            "instruction": item.instruction,
            "status": item.status,
            "error": item.error,
            "candidates": pool,
            "output": output.text if output else None,
            "truncation": item.truncation,
        }
        yield _dump(record) + "\n"


_WRITERS: dict[ExportFormat, Callable[[Rows, str], Iterator[str]]] = {
    ExportFormat.ALPACA_EVAL: alpaca_eval_lines,
    ExportFormat.JSONL: jsonl_lines,
    ExportFormat.POOLS: pools_lines,
}


def _finished_rows(database_url: str, job_id: str, *, with_pools: bool) -> Rows:
    """The job's finished items in input order, one short transaction per page."""
    after = -1
    while True:
        with session_scope(database_url) as session:
            page = queries.finished_items(
                session, job_id, after_position=after, limit=PAGE_SIZE, with_pools=with_pools
            )
        yield from page
        if len(page) < PAGE_SIZE:
            return
        after = page[-1][0].position


def export_lines(
    database_url: str, job_id: str, export_format: ExportFormat, generator: str
) -> Iterator[str]:
    """The lines of one export of a job; `generator` names the outputs (AlpacaEval's `generator`)."""
    rows = _finished_rows(database_url, job_id, with_pools=export_format == ExportFormat.POOLS)
    return _WRITERS[export_format](rows, generator)
