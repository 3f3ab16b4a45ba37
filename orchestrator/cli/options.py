"""Options that more than one command takes: how to read an input file, and what to write."""

from __future__ import annotations

from typing import Annotated

import typer

from orchestrator.exports import ExportFormat
from orchestrator.inputs import InputFormat

__all__ = ["FieldOption", "InputFormatOption", "OutputFormatOption"]

InputFormatOption = Annotated[
    InputFormat | None,
    typer.Option(help="The input's format (default: by suffix; .json and .jsonl by their first character)."),
]
FieldOption = Annotated[
    list[str] | None,
    typer.Option(
        "--field",
        metavar="FIELD=COLUMN",
        help="Take a record's field from another column: --field instruction=prompt --field id=uid.",
    ),
]
OutputFormatOption = Annotated[
    ExportFormat | None,
    typer.Option("--format", help="What to write (default: by suffix: .json, .jsonl, .parquet)."),
]
