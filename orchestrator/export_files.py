"""Export files: the format an output file's name asks for, so the file is what the next tool reads.

`slimmoa run -o FILE` and `slimmoa export -o FILE` write `.json` as one JSON list (AlpacaEval's
`--model_outputs` reads only that), `.jsonl` one object a line and `.parquet` Parquet. `--format` picks
any export format instead; a suffix that says otherwise is refused before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from db.models import Job
from db.session import session_scope
from orchestrator.errors import ExportError
from orchestrator.exports import ExportFormat, file_suffix, open_export

__all__ = ["OUTPUT_SUFFIXES", "answers", "output_format"]

# The format a suffix stands for when --format is not given.
OUTPUT_SUFFIXES = {
    ".json": ExportFormat.ALPACA_EVAL,
    ".jsonl": ExportFormat.JSONL,
    ".ndjson": ExportFormat.JSONL,
    ".parquet": ExportFormat.PARQUET,
}
_KINDS = {"json": "a JSON list", "jsonl": "JSON Lines", "parquet": "Parquet"}


def output_format(path: Path, requested: ExportFormat | None = None) -> ExportFormat:
    """The format to write `path` in: `requested`, else the one its suffix stands for.

    Raises ExportError when neither says, or when the suffix contradicts `requested` (`.json` with
    `--format jsonl`); other suffixes go with any requested format.
    """
    suffix = path.suffix.lower()
    by_suffix = OUTPUT_SUFFIXES.get(suffix)
    if requested is None:
        if by_suffix is None:
            known = ", ".join(f"{s} ({f})" for s, f in OUTPUT_SUFFIXES.items())
            raise ExportError(
                "--output", f"cannot tell the format of {path.name}: use a suffix {known} or --format"
            )
        return by_suffix
    if by_suffix is not None and file_suffix(by_suffix) != file_suffix(requested):
        raise ExportError(
            "--format",
            f"{requested} writes {_KINDS[file_suffix(requested)]}, but {path.name} is a {suffix} file "
            f"({_KINDS[file_suffix(by_suffix)]}): change the suffix or the format",
        )
    return requested


def answers(database_url: str, job_id: str) -> Iterator[dict[str, Any]]:
    """The job's outputs as the `jsonl` export has them (id, instruction, output, ...), from the record."""
    with session_scope(database_url) as session:
        for chunk in open_export(session, session.get_one(Job, job_id), ExportFormat.JSONL).chunks:
            for line in chunk.decode().split("\n"):
                if line:
                    yield json.loads(line)
