"""Result serialisers: one function per export format, each writing a job's finished items.

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
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from db import queries
from db.models import Candidate, Item, Job, Output
from db.session import session_scope
from orchestrator.recipes import OpenAIModel, Recipe, VllmModel

__all__ = [
    "METADATA_HEADER",
    "PARQUET_METADATA_KEY",
    "Export",
    "ExportContext",
    "ExportError",
    "ExportFormat",
    "ExportMetadata",
    "ModelRecord",
    "Rejected",
    "RejectedRule",
    "alpaca_eval_lines",
    "file_suffix",
    "jsonl_lines",
    "metadata_path",
    "open_export",
    "parquet_chunks",
    "pools_lines",
    "preference_lines",
    "sft_lines",
]

# Items per query, and per Parquet row group: a page of 500 items with pools of a few candidates is a
# few MB at most.
PAGE_SIZE = 500
# Lines per chunk of a text export: one thread hop of the streaming response per chunk, not per line.
CHUNK_LINES = 200
METADATA_HEADER = "SlimMoA-Metadata"
PARQUET_METADATA_KEY = b"slimmoa"
NDJSON = "application/x-ndjson"

Rows = Iterator[tuple[Item, Output | None]]


class ExportFormat(enum.StrEnum):
    ALPACA_EVAL = "alpaca_eval"  # one JSON list: instruction, output, generator, dataset
    JSONL = "jsonl"  # one object a line: id plus the AlpacaEval fields
    POOLS = "pools"  # one object a line: the item, its whole candidate pool, status and output
    SFT = "sft"  # one object a line: id, instruction, system (if any), the aggregated output
    PREFERENCE = "preference"  # one object a line: the output as chosen, a final-layer candidate rejected
    PARQUET = "parquet"  # one row per item with an output: the SFT fields, dataset, status and the pool


class ExportError(ValueError):
    """An export that cannot be made as asked: `param` names the parameter at fault, `reason` says why."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}")
        self.param = param
        self.reason = reason


class RejectedRule(enum.StrEnum):
    SHORTEST = "shortest"
    LONGEST = "longest"
    RANDOM = "random"  # seeded by the item's id: the same export twice rejects the same candidates
    MODEL = "model"  # `model:NAME`: that model's candidate (its lowest slot when it samples several)


@dataclass(frozen=True)
class Rejected:
    """Which candidate of the final layer's pool a preference pair rejects.

    Eligible are the candidates that succeeded and whose text differs from the aggregated output
    (ignoring surrounding white space); an item with none is left out of the export. Ties go to the
    lowest slot.
    """

    rule: RejectedRule = RejectedRule.SHORTEST
    model: str | None = None

    @classmethod
    def parse(cls, text: str) -> Rejected:
        """`shortest`, `longest`, `random` or `model:NAME`; ExportError naming the choices otherwise."""
        name, colon, model = text.partition(":")
        if name == RejectedRule.MODEL and colon and model:
            return cls(RejectedRule.MODEL, model)
        if not colon and name in set(RejectedRule) - {RejectedRule.MODEL}:
            return cls(RejectedRule(name))
        raise ExportError("rejected", f"expected shortest, longest, random or model:NAME, got {text!r}")

    def __str__(self) -> str:
        return f"{self.rule}:{self.model}" if self.rule == RejectedRule.MODEL else str(self.rule)

    def choose(self, item_id: int, pool: Sequence[Candidate], output: str) -> Candidate | None:
        """The rejected candidate of one item's final-layer pool (in slot order), or None."""
        eligible = sorted(
            (c for c in pool if c.ok and c.text is not None and c.text.strip() != output.strip()),
            key=lambda c: c.slot,
        )
        if self.rule == RejectedRule.MODEL:
            eligible = [c for c in eligible if c.model == self.model]
        if not eligible:
            return None
        if self.rule == RejectedRule.SHORTEST:
            return min(eligible, key=lambda c: len(c.text or ""))
        if self.rule == RejectedRule.LONGEST:
            return max(eligible, key=lambda c: len(c.text or ""))
        if self.rule == RejectedRule.RANDOM:
            return random.Random(item_id).choice(eligible)
        return eligible[0]


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


@dataclass(frozen=True)
class ExportContext:
    """What a writer needs besides the rows."""

    metadata: ExportMetadata
    final_layer: int = 0
    rejected: Rejected = field(default_factory=Rejected)


def _dump(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def _item_id(item: Item) -> str:
    return item.external_id or str(item.position)


def _answer(item: Item, output: Output, generator: str) -> dict[str, Any]:
    return {
        "id": _item_id(item),
        "instruction": item.instruction,
        "output": output.text,
        "generator": generator,
        "dataset": item.dataset or "",
    }


def _prompt(item: Item) -> dict[str, Any]:
    """The fields of an example's prompt: `system` only where the item has one."""
    record = {"id": _item_id(item), "instruction": item.instruction}
    return record | ({"system": item.system} if item.system is not None else {})


def jsonl_lines(rows: Rows, context: ExportContext) -> Iterator[str]:
    """One JSON object a line per item with an output (failed items have none)."""
    for item, output in rows:
        if output is not None:
            yield _dump(_answer(item, output, context.metadata.generator))


def alpaca_eval_lines(rows: Rows, context: ExportContext) -> Iterator[str]:
    """AlpacaEval's model-outputs file: a JSON list, one element a line."""
    yield "["
    separator = "\n"
    for line in jsonl_lines(rows, context):
        yield separator + line.rstrip("\n")
        separator = ",\n"
    yield "\n]\n"


def _pool(item: Item) -> list[dict[str, Any]]:
    return [
        {"layer": c.layer, "slot": c.slot, "model": c.model, "text": c.text, "error": c.error}
        for c in item.candidates
    ]


def pools_lines(rows: Rows, context: ExportContext) -> Iterator[str]:
    """Every finished item with its whole candidate pool (per layer and slot), its status and output."""
    for item, output in rows:
        record = {
            "id": _item_id(item),
            "instruction": item.instruction,
            "status": item.status,
            "error": item.error,
            "candidates": _pool(item),
            "output": output.text if output else None,
            "truncation": item.truncation,
        }
        yield _dump(record)


def sft_lines(rows: Rows, context: ExportContext) -> Iterator[str]:
    """Supervised fine-tuning examples: the prompt and the aggregated output, per item with an output."""
    for item, output in rows:
        if output is not None:
            yield _dump(_prompt(item) | {"output": output.text})


def preference_lines(rows: Rows, context: ExportContext) -> Iterator[str]:
    """Preference pairs: the aggregated output as chosen, a final-layer candidate (by the rule) rejected."""
    for item, output in rows:
        if output is None:
            continue
        pool = [c for c in item.candidates if c.layer == context.final_layer]
        rejected = context.rejected.choose(item.id, pool, output.text)
        if rejected is None:
            continue
        yield _dump(
            _prompt(item)
            | {
                "chosen": output.text,
                "rejected": rejected.text,
                "rejected_model": rejected.model,
                "rejected_slot": rejected.slot,
            }
        )


_CANDIDATE = pa.struct(
    [
        ("layer", pa.int32()),
        ("slot", pa.int32()),
        ("model", pa.string()),
        ("text", pa.string()),
        ("error", pa.string()),
    ]
)
PARQUET_FIELDS = [
    ("id", pa.string()),
    ("instruction", pa.string()),
    ("system", pa.string()),
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
                "id": _item_id(item),
                "instruction": item.instruction,
                "system": item.system,
                "dataset": item.dataset,
                "output": output.text,
                "status": item.status,
                "candidates": _pool(item),
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


@dataclass(frozen=True)
class Export:
    """One export of a job: its metadata, how to serve it, and its body in bytes chunks (read lazily)."""

    metadata: ExportMetadata
    media_type: str
    filename: str
    chunks: Iterator[bytes]


def open_export(
    database_url: str, job: Job, export_format: ExportFormat, rejected: Rejected | None = None
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
    rows = _finished_rows(database_url, job.id, with_pools=spec.with_pools)
    context = ExportContext(metadata=metadata, final_layer=final_layer, rejected=chosen)
    return Export(metadata, spec.media_type, f"{job.id}.{spec.suffix}", spec.write(rows, context))
