"""The command line's terminal: one console for results, one for errors, how a command fails, and the
shared pieces of commands that follow long work or write files."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from orchestrator.errors import USAGE_ERROR, SlimMoAError
from orchestrator.exports import metadata_path

__all__ = ["POLL_INTERVAL_S", "console", "err", "fail", "fail_on", "save_atomically"]

console = Console()
err = Console(stderr=True)

# How often a command that follows a job or an evaluation reads its progress.
POLL_INTERVAL_S = 0.5


def fail(message: str, code: int = USAGE_ERROR) -> typer.Exit:
    """Print `error: message` on stderr and return the exit to raise."""
    err.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    return typer.Exit(code)


def fail_on(exc: SlimMoAError) -> typer.Exit:
    """The exit for an orchestrator error: its message, and the exit code its class maps to."""
    return fail(str(exc), code=exc.exit_code)


def save_atomically(path: Path, chunks: Iterable[bytes], metadata: dict[str, Any]) -> Path:
    """Write an export atomically (readers never see a half-written file), its metadata record beside it."""
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    metadata_path(path).write_text(
        json.dumps(metadata, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    partial.replace(path)
    return path
