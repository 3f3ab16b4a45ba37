"""Exports: a job's finished items in one of the formats, with the metadata record beside them. The
text formats' writers are in `orchestrator.export_writers`; Parquet is written here.

The API streams them and `slimmoa run` writes them to files. Items are read in keyset pages, so a job
of any size is exported in constant memory, and a job that is still running exports what has finished.

Every export has one metadata record (`ExportMetadata`: the job, its recipe and the recipe's models).
It travels beside the data, never as a data row, so each file stays what its readers expect (AlpacaEval
reads a plain list; a trainer reads one example a line): the API sends it in the `SlimMoA-Metadata`
header, `slimmoa export` and `slimmoa run` write it to `FILE.metadata.json`, and Parquet, which has a
place for it, also carries it in the file's key-value metadata under `slimmoa`.
"""

from __future__ import annotations

import enum
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel
from sqlalchemy.orm import Session

from db.models import Job
from db.results import finished_items
from orchestrator.errors import ExportError
from orchestrator.export_writers import (
    ExportContext,
    Rejected,
    RejectedRule,
    Rows,
    alpaca_eval_lines,
    conversation,
    item_id,
    jsonl_lines,
    mt_bench_lines,
    pool_records,
    pools_lines,
    preference_lines,
    sft_lines,
)
from orchestrator.recipes import OpenAIModel, Recipe, VllmModel

__all__ = [
    "METADATA_HEADER",
    "PARQUET_METADATA_KEY",
    "Export",
    "ExportFormat",
    "ExportMetadata",
    "ModelRecord",
    "file_suffix",
    "metadata_path",
    "open_export",
    "parquet_chunks",
]

# Items per query, and per Parquet row group: a page of 500 items with pools of a few candidates is a
# few MB at most.
PAGE_SIZE = 500
# Lines per chunk of a text export: one thread hop of the streaming response per chunk, not per line.
CHUNK_LINES = 200
METADATA_HEADER = "SlimMoA-Metadata"
PARQUET_METADATA_KEY = b"slimmoa"
NDJSON = "application/x-ndjson"


class ExportFormat(enum.StrEnum):
    ALPACA_EVAL = "alpaca_eval"  # one JSON list: instruction, output, generator, dataset
    JSONL = "jsonl"  # one object a line: id plus the AlpacaEval fields
    POOLS = "pools"  # one object a line: the item, its whole candidate pool, status and output
    SFT = "sft"  # one object a line: id, instruction, system (if any), the aggregated output
    PREFERENCE = "preference"  # one object a line: the output as chosen, a final-layer candidate rejected
    PARQUET = "parquet"  # one row per item with an output: the SFT fields, dataset, status and the pool
    MT_BENCH = "mt_bench"  # FastChat's MT-Bench answers: question_id, model_id, every turn's output


class ModelRecord(BaseModel):
    name: str
    engine: str
    # vLLM: the weights (a folder, a Hugging Face id or embedded:NAME); OpenAI: the served model;
    # synthetic: none.
    model_id: str | None


class ExportMetadata(BaseModel):
    """What produced an export: the job, its recipe and the recipe's models."""

    job_id: str
    job_name: str | None
    recipe: str
    generator: str
    format: ExportFormat
    models: list[ModelRecord]
    aggregator: str
    # The preference rule (`shortest`, `model:NAME`, ...); None for the other formats.
    rejected: str | None = None

    @classmethod
    def of(cls, job: Job, recipe: Recipe, export_format: ExportFormat, rejected: Rejected) -> ExportMetadata:
        models = [
            ModelRecord(name=name, engine=spec.engine, model_id=_model_id(spec))
            for name, spec in recipe.models.items()
        ]
        return cls(
            job_id=job.id,
            job_name=job.name,
            recipe=job.recipe_name,
            generator=f"slimmoa-{job.recipe_name}",
            format=export_format,
            models=models,
            aggregator=recipe.aggregator.model,
            rejected=str(rejected) if export_format == ExportFormat.PREFERENCE else None,
        )

    def header(self) -> str:
        """As an HTTP header value: JSON with every non-ASCII character escaped."""
        return json.dumps(self.model_dump(mode="json"))


def _model_id(spec: Any) -> str | None:
    if isinstance(spec, VllmModel):
        return spec.weights
    if isinstance(spec, OpenAIModel):
        return spec.model
    return None


_CANDIDATE = pa.struct(
    [
        ("turn", pa.int32()),
        ("layer", pa.int32()),
        ("slot", pa.int32()),
        ("model", pa.string()),
        ("text", pa.string()),
        ("error", pa.string()),
    ]
)
_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
PARQUET_FIELDS = [
    ("id", pa.string()),
    ("instruction", pa.string()),
    ("system", pa.string()),
    ("messages", pa.list_(_MESSAGE)),
    ("dataset", pa.string()),
    ("output", pa.string()),
    ("status", pa.string()),
    ("candidates", pa.list_(_CANDIDATE)),
]


class _Spool(io.RawIOBase):
    """A write-only sink that hands out what was written so far; `tell` counts every byte ever written,
    which the Parquet writer needs for the offsets in the file's footer."""

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[bytes] = []
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        self._position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._position

    def drain(self) -> bytes:
        chunk = b"".join(self._parts)
        self._parts.clear()
        return chunk


def parquet_chunks(rows: Rows, context: ExportContext) -> Iterator[bytes]:
    """One Parquet file, streamed: a row group per page of items, each yielded as soon as it is written.

    Rows are the items with an output; the metadata record is in the schema's key-value metadata.
    """
    schema = pa.schema(
        PARQUET_FIELDS, metadata={PARQUET_METADATA_KEY: context.metadata.model_dump_json().encode()}
    )
    spool = _Spool()
    writer = pq.ParquetWriter(spool, schema)
    while page := list(islice(rows, PAGE_SIZE)):
        records = [
            {
                "id": item_id(item),
                "instruction": item.instruction,
                "system": item.system,
                "messages": conversation(item),
                "dataset": item.dataset,
                "output": output.text,
                "status": item.status,
                "candidates": pool_records(item, context.final_layer),
            }
            for item, output in page
            if output is not None
        ]
        if records:
            writer.write_table(pa.Table.from_pylist(records, schema=schema))
            yield spool.drain()
    writer.close()
    yield spool.drain()


def _encoded(lines: Iterator[str]) -> Iterator[bytes]:
    while chunk := "".join(islice(lines, CHUNK_LINES)):
        yield chunk.encode()


@dataclass(frozen=True)
class _Format:
    write: Callable[[Rows, ExportContext], Iterator[bytes]]
    media_type: str
    suffix: str
    with_pools: bool = False


def _text(
    writer: Callable[[Rows, ExportContext], Iterator[str]],
) -> Callable[[Rows, ExportContext], Iterator[bytes]]:
    return lambda rows, context: _encoded(writer(rows, context))


_FORMATS: dict[ExportFormat, _Format] = {
    ExportFormat.ALPACA_EVAL: _Format(_text(alpaca_eval_lines), "application/json", "json"),
    ExportFormat.JSONL: _Format(_text(jsonl_lines), NDJSON, "jsonl"),
    ExportFormat.POOLS: _Format(_text(pools_lines), NDJSON, "jsonl", with_pools=True),
    ExportFormat.SFT: _Format(_text(sft_lines), NDJSON, "jsonl"),
    ExportFormat.PREFERENCE: _Format(_text(preference_lines), NDJSON, "jsonl", with_pools=True),
    ExportFormat.MT_BENCH: _Format(_text(mt_bench_lines), NDJSON, "jsonl"),
    ExportFormat.PARQUET: _Format(
        parquet_chunks, "application/vnd.apache.parquet", "parquet", with_pools=True
    ),
}
MEDIA_TYPES = sorted({spec.media_type for spec in _FORMATS.values()})


def file_suffix(export_format: ExportFormat) -> str:
    """The suffix of a file in this format (`json`, `jsonl` or `parquet`), as the API's file names have it."""
    return _FORMATS[export_format].suffix


def metadata_path(path: Path) -> Path:
    """Where a file export's metadata record is written: beside it, as `FILE.metadata.json`."""
    return path.with_name(path.name + ".metadata.json")


def _finished_rows(session: Session, job_id: str, *, with_pools: bool) -> Rows:
    """The job's finished items in input order, one short transaction per page: the session gives its
    connection back after each page, so none is held while the reader is slow."""
    after = -1
    while True:
        page = finished_items(session, job_id, after_position=after, limit=PAGE_SIZE, with_pools=with_pools)
        session.close()
        yield from page
        if len(page) < PAGE_SIZE:
            return
        after = page[-1][0].position


@dataclass(frozen=True)
class Export:
    """One export of a job: its metadata, how to serve it, and its body in bytes chunks (read lazily)."""

    metadata: ExportMetadata
    media_type: str
    filename: str
    chunks: Iterator[bytes]


def open_export(
    session: Session, job: Job, export_format: ExportFormat, rejected: Rejected | None = None
) -> Export:
    """Prepare an export of `job` (a row already read); nothing is read from its items until iterated.

    Raises ExportError when the preference rule names a model that is not a final-layer proposer.
    """
    recipe = Recipe.model_validate(job.recipe)
    chosen = rejected or Rejected()
    final_layer = len(recipe.layers) - 1
    if export_format == ExportFormat.PREFERENCE and chosen.rule == RejectedRule.MODEL:
        proposers = {slot.model for slot in recipe.slots(final_layer)}
        if chosen.model not in proposers:
            known = ", ".join(sorted(proposers))
            reason = f"model {chosen.model!r} is not a proposer of the final layer (proposers: {known})"
            raise ExportError("rejected", reason)
    metadata = ExportMetadata.of(job, recipe, export_format, chosen)
    spec = _FORMATS[export_format]
    rows = _finished_rows(session, job.id, with_pools=spec.with_pools)
    context = ExportContext(metadata=metadata, final_layer=final_layer, rejected=chosen)
    return Export(metadata, spec.media_type, f"{job.id}.{spec.suffix}", spec.write(rows, context))
