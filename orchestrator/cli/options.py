"""Options that more than one command takes: how to read an input file, what to write, how to judge."""

from __future__ import annotations

from typing import Annotated

import typer

from orchestrator.exports import ExportFormat
from orchestrator.inputs import InputFormat

__all__ = ["FieldOption", "InputFormatOption", "JudgeOption", "OutputFormatOption", "ReferenceOption"]

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
JudgeOption = Annotated[
    str | None,
    typer.Option(help="An OpenAI-compatible URL, or RECIPE[:MODEL] for a local model; default: EVAL_JUDGE."),
]
ReferenceOption = Annotated[
    str | None, typer.Option(help="Reference outputs (JSONL or JSON list); default: EVAL_REFERENCE.")
]
