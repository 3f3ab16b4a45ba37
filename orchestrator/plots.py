"""The comparison plot: one job's win rate over another, by dataset subset and by output length (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_comparison"]


def _panel(axis: Any, rows: dict[str, dict[str, Any]], title: str, xlabel: str) -> None:
    names = list(rows)
    rates = [rows[name]["win_rate"] for name in names]
    # A group of one judgment has no standard error: no error bar.
    errors = [rows[name]["standard_error"] or 0.0 for name in names]
    axis.bar(range(len(names)), rates, yerr=errors, capsize=4, color="#4c72b0")
    axis.axhline(50, color="grey", linestyle="--", linewidth=1)
    axis.set_xticks(range(len(names)), [f"{name}\n(n={int(rows[name]['n'])})" for name in names], fontsize=8)
    axis.set_ylim(0, 100)
    axis.set_ylabel("win rate of A (%)")
    axis.set_xlabel(xlabel)
    axis.set_title(title)


def plot_comparison(summary: dict[str, Any], path: Path, *, title: str) -> Path:
    """Write a two-panel PNG (win rate by dataset subset, by A's output length) and return its path."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    _panel(left, summary["by_dataset"], "by dataset subset", "dataset")
    _panel(right, summary["by_output_length"], "by output length", "A's output length (characters)")
    overall = f"A wins {summary['win_rate']:.1f} ± {summary['standard_error']:.1f} %"
    if summary.get("lc_win_rate") is not None:
        overall += f", length-controlled {summary['lc_win_rate']:.1f} %"
    figure.suptitle(f"{title}\n{overall}", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
    return path
