"""The command line's terminal: one console for results, one for errors, and how a command fails."""

from __future__ import annotations

import typer
from rich.console import Console

__all__ = ["USAGE_ERROR", "console", "err", "fail"]

console = Console()
err = Console(stderr=True)

# Exit code of a command refused before it did anything (bad input, unknown recipe, missing file).
USAGE_ERROR = 2


def fail(message: str, code: int = USAGE_ERROR) -> typer.Exit:
    """Print `error: message` on stderr and return the exit to raise."""
    err.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
    return typer.Exit(code)
