"""Reading prompt files: JSONL (one record a line) or a JSON list (AlpacaEval's format).

Every record is validated before anything is stored; the first problem is reported with the file,
the line (or list index) and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orchestrator.contracts import InputRecord
from orchestrator.errors import InputError, first_validation_message

__all__ = ["parse_records", "read_records"]


def _validate(data: Any, where: str) -> InputRecord:
    if not isinstance(data, dict):
        raise InputError(f"{where}: a record must be a JSON object, got {type(data).__name__}")
    try:
        return InputRecord.model_validate(data)
    except ValidationError as exc:
        field, message = first_validation_message(exc)
        raise InputError(f"{where}: field '{field}' {message}") from exc


def _json_list_with_lines(text: str) -> list[tuple[int, Any]]:
    """Decode a top-level JSON list element by element, keeping the line each element starts on."""
    decoder = json.JSONDecoder()
    whitespace = " \t\n\r"
    position = text.index("[") + 1
    elements: list[tuple[int, Any]] = []
    while True:
        while position < len(text) and text[position] in whitespace:
            position += 1
        if position < len(text) and text[position] == "]" and not elements:
            position += 1
            break
        value, end = decoder.raw_decode(text, position)
        elements.append((text.count("\n", 0, position) + 1, value))
        position = end
        while position < len(text) and text[position] in whitespace:
            position += 1
        if position < len(text) and text[position] == ",":
            position += 1
            continue
        if position < len(text) and text[position] == "]":
            position += 1
            break
        raise json.JSONDecodeError("expected ',' or ']' after a list element", text, position)
    if text[position:].strip():
        raise json.JSONDecodeError("extra data after the list", text, position)
    return elements


def parse_records(text: str, source: str) -> list[InputRecord]:
    """Parse a JSON list or JSONL text; `source` names the file in error messages."""
    stripped = text.lstrip()
    if not stripped:
        raise InputError(f"{source}: the file is empty: expected JSONL records or a JSON list")
    if stripped.startswith("["):
        try:
            data = _json_list_with_lines(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{source}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
        if not data:
            raise InputError(f"{source}: the JSON list is empty")
        return [
            _validate(record, f"{source}:{line}: record [{index}]")
            for index, (line, record) in enumerate(data)
        ]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{source}:{number}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
        records.append(_validate(data, f"{source}:{number}"))
    return records


def read_records(path: Path, limit: int | None = None) -> list[InputRecord]:
    """All records of a prompt file (the first `limit` when given)."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    records = parse_records(text, str(path))
    return records[:limit] if limit is not None else records
