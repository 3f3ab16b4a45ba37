"""Prompt files and submitted items: read in any supported format, fields mapped, validated, ids checked.

Formats: JSON Lines, a JSON list (AlpacaEval's), Parquet and CSV, chosen by the file's suffix or named
(`InputFormat`). JSON text (`.jsonl`, `.json`, any other suffix but a Parquet file's) is a list or lines
as its first character says. A `FieldMap` (`instruction=prompt`) says which column holds a field.

Every record is validated before anything is stored; the first problem is reported with the file, the
line (or row) and the field. Ids are how outputs, pools and evaluations are joined, so they must be unique
within a job; a record without one gets its position (as the exports already called it).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import IO, Any

from pydantic import ValidationError

from orchestrator.contracts import InputRecord
from orchestrator.errors import InputError, validation_message
from orchestrator.input_readers import (
    Place,
    Row,
    Select,
    csv_rows,
    json_rows,
    parquet_rows,
    text_lines,
)

__all__ = [
    "FIELDS",
    "FieldMap",
    "InputFormat",
    "assign_ids",
    "map_items",
    "parse_records",
    "read_records",
    "read_stream",
    "upload_options",
]

# The fields of a record a column can be mapped to (`InputRecord`'s).
FIELDS = ("instruction", "id", "dataset", "system", "messages", "turns")
PARQUET_MAGIC = b"PAR1"


class InputFormat(enum.StrEnum):
    JSONL = "jsonl"  # one JSON object a line
    JSON = "json"  # one JSON list of objects (AlpacaEval)
    PARQUET = "parquet"
    CSV = "csv"  # comma-separated, a header row first


_BY_SUFFIX = {".parquet": InputFormat.PARQUET, ".csv": InputFormat.CSV}
_JSON_SUFFIXES = {".json", ".jsonl", ".ndjson"}


@dataclass(frozen=True)
class FieldMap:
    """Which column holds each field of a record (`{"instruction": "prompt"}`); others keep their names."""

    sources: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, mapping: Mapping[str, object] | None, option: str = "fields") -> FieldMap:
        """From a mapping of field to column; InputError naming `option` if it is not one."""
        sources: dict[str, str] = {}
        for target, column in (mapping or {}).items():
            if target not in FIELDS:
                raise InputError(f"{option}: unknown field {target!r} (fields: {', '.join(FIELDS)})")
            if not isinstance(column, str) or not column:
                raise InputError(f"{option}.{target}: expected a column name")
            sources[target] = column
        return cls(sources)

    @classmethod
    def parse(cls, specs: Sequence[str], option: str = "--field") -> FieldMap:
        """From `FIELD=COLUMN` texts, as given on the command line."""
        mapping: dict[str, str] = {}
        for spec in specs:
            target, equals, column = spec.partition("=")
            target = target.strip()
            if not equals or not target or not column:
                raise InputError(f"{option} {spec!r}: expected FIELD=COLUMN, such as instruction=prompt")
            if target in mapping:
                raise InputError(f"{option}: {target} is mapped twice ({mapping[target]!r}, {column!r})")
            mapping[target] = column
        return cls.of(mapping, option)

    def source(self, target: str) -> str:
        return self.sources.get(target, target)

    def label(self, target: str) -> str:
        """How messages name a field: the file's column, and the field it is mapped to."""
        column = self.source(target)
        return f"{column!r} (mapped to {target})" if target in self.sources else repr(target)

    def renamed(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """A record's fields taken from their columns (absent and null columns left out)."""
        data = {target: raw.get(self.source(target)) for target in FIELDS}
        return {target: value for target, value in data.items() if value is not None}

    def select(self, source: str) -> Select:
        """The columns a table must be read with; InputError naming the file's columns if one is absent."""

        def columns(names: Sequence[str]) -> list[str]:
            have = ", ".join(names) or "none"
            for target in FIELDS:
                column = self.source(target)
                if column in names:
                    continue
                if target in self.sources:
                    raise InputError(f"{source}: no column {column!r} (mapped to {target}); columns: {have}")
                if target == "instruction" and not {self.source("messages"), self.source("turns")} & set(
                    names
                ):
                    raise InputError(
                        f"{source}: no column 'instruction' (columns: {have}); "
                        "map one with --field instruction=COLUMN (API: fields)"
                    )
            return list(dict.fromkeys(c for c in map(self.source, FIELDS) if c in names))

        return columns


def _text(value: object, place: Place, label: str) -> object:
    if not isinstance(value, bytes):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{place}: field {label}: not UTF-8 text ({exc.reason} at byte {exc.start + 1})"
        ) from None


def _record(place: Place, raw: object, fields: FieldMap) -> InputRecord:
    if not isinstance(raw, dict):
        raise InputError(f"{place}: a record must be a JSON object, got {type(raw).__name__}")
    data = {
        target: _text(value, place, fields.label(target)) for target, value in fields.renamed(raw).items()
    }
    try:
        return InputRecord.model_validate(data)
    except ValidationError as exc:
        problem = exc.errors()[0]
        target = str(problem["loc"][0]) if problem["loc"] else "record"
        missing = problem["type"] == "missing"
        message = validation_message(dict(problem))
        if missing and fields.source(target) not in raw:
            message += f" (the record has: {', '.join(map(str, raw)) or 'no fields'})"
        raise InputError(f"{place}: field {fields.label(target)} {message}") from None


class _Ids:
    """Checks that ids are unique and gives a record without one its position."""

    def __init__(self, fields: FieldMap) -> None:
        self._label = fields.label("id")
        self._seen: dict[str, str] = {}

    def check(self, record: InputRecord, position: int, where: str, short: str) -> InputRecord:
        given = record.id is not None
        if not given:
            record = record.model_copy(update={"id": str(position)})
        assert record.id is not None
        earlier = self._seen.get(record.id)
        if earlier is not None:
            if given:
                raise InputError(f"{where}: field {self._label} {record.id!r} is already the id of {earlier}")
            raise InputError(
                f"{where}: a record without an id gets its position, {record.id!r}, "
                f"which is already the id of {earlier}"
            )
        self._seen[record.id] = short if given else f"{short} (its position; it has no id)"
        return record


def _collect(rows: Iterator[Row], source: str, fields: FieldMap, limit: int | None) -> list[InputRecord]:
    """Validated records with unique ids; InputError at the first problem."""
    ids = _Ids(fields)
    keys: set[str] = set()
    records: list[InputRecord] = []
    for place, raw in rows:
        record = _record(place, raw, fields)
        keys.update(map(str, raw))
        records.append(ids.check(record, len(records), str(place), place.short()))
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise InputError(f"{source}: no records: the file has no rows")
    for target, column in fields.sources.items():
        if column not in keys:
            have = ", ".join(sorted(keys))
            raise InputError(
                f"{source}: no record has {column!r} (mapped to {target}); the records have: {have}"
            )
    return records


def _format_of(name: str, requested: InputFormat | None, head: bytes) -> InputFormat | None:
    """The file's format: as requested, else by suffix; None for JSON text, a list or lines."""
    if requested is not None:
        return requested
    suffix = PurePath(name).suffix.lower()
    if suffix in _BY_SUFFIX:
        return _BY_SUFFIX[suffix]
    if suffix not in _JSON_SUFFIXES and head.startswith(PARQUET_MAGIC):
        return InputFormat.PARQUET
    return None


def read_stream(
    handle: IO[bytes],
    source: str,
    *,
    input_format: InputFormat | None = None,
    fields: FieldMap | None = None,
    limit: int | None = None,
) -> list[InputRecord]:
    """The records of a seekable binary file (an upload), from its start; `source` is its name, for the
    suffix and messages."""
    mapping = fields or FieldMap()
    handle.seek(0)
    head = handle.read(len(PARQUET_MAGIC))
    handle.seek(0)
    chosen = _format_of(source, input_format, head)
    rows: Iterator[Row]
    if chosen == InputFormat.PARQUET:
        rows = parquet_rows(handle, source, mapping.select(source))
    elif chosen == InputFormat.CSV:
        rows = csv_rows(handle, source, mapping.select(source))
    else:
        listed = None if chosen is None else chosen == InputFormat.JSON
        rows = json_rows(text_lines(handle, source), source, listed=listed)
    return _collect(rows, source, mapping, limit)


def read_records(
    path: Path,
    limit: int | None = None,
    *,
    input_format: InputFormat | None = None,
    fields: FieldMap | None = None,
) -> list[InputRecord]:
    """All records of a prompt file (the first `limit` when given: the rest is not read)."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with path.open("rb") as handle:
        return read_stream(handle, str(path), input_format=input_format, fields=fields, limit=limit)


def parse_records(text: str, source: str, *, fields: FieldMap | None = None) -> list[InputRecord]:
    """Parse a JSON list or JSONL text; `source` names the file in error messages."""
    lines = text.removeprefix("\ufeff").split("\n")
    numbered = ((n, line if n == len(lines) else line + "\n") for n, line in enumerate(lines, start=1))
    return _collect(json_rows(numbered, source), source, fields or FieldMap(), None)


def assign_ids(
    records: Sequence[InputRecord], place: Callable[[int], str], fields: FieldMap | None = None
) -> list[InputRecord]:
    """Submitted items with unique ids (a missing one becomes the position); `place(i)` names item i."""
    ids = _Ids(fields or FieldMap())
    return [ids.check(record, i, place(i), place(i)) for i, record in enumerate(records)]


def map_items(data: object) -> object:
    """A JSON submission whose `fields` maps columns: its items with their fields taken from those columns.

    Anything else is returned as it is, for its own validation to judge. Raises InputError (a ValueError)
    for an unknown field or a column that no item has.
    """
    if not isinstance(data, dict) or not isinstance(data.get("fields"), dict):
        return data
    fields = FieldMap.of(data["fields"])
    items = data.get("items")
    if not isinstance(items, list):
        return data
    keys = {str(key) for item in items if isinstance(item, dict) for key in item}
    for target, column in fields.sources.items():
        if column not in keys:
            have = ", ".join(sorted(keys)) or "none"
            raise InputError(f"fields.{target}: no item has {column!r}; the items have: {have}")
    return data | {"items": [fields.renamed(item) if isinstance(item, dict) else item for item in items]}


def upload_options(fields: object, input_format: object) -> tuple[FieldMap, InputFormat | None]:
    """The `fields` (a JSON object, as text) and `input_format` of a multipart upload; either may be unset."""
    mapping = FieldMap()
    if fields is not None and fields != "":
        try:
            parsed = json.loads(fields) if isinstance(fields, str) else None
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise InputError('fields: expected a JSON object such as {"instruction": "prompt"}')
        mapping = FieldMap.of(parsed)
    if input_format is None or input_format == "":
        return mapping, None
    if not isinstance(input_format, str) or input_format not in set(InputFormat):
        raise InputError(f"input_format: expected one of {', '.join(InputFormat)}")
    return mapping, InputFormat(input_format)
