"""Win rates from pairwise preferences: the raw win rate with its standard error, and AlpacaEval 2.0's
length-controlled win rate.

The length-controlled (LC) win rate fits a logistic regression of the preference (the probability that
the model's output beats the reference's) on three terms, without an intercept:

    logit P(model wins on i) = w_len * tanh(delta_len_i / sd(delta_len))
                             + w_diff * difficulty_i
                             + w_model

where delta_len is the reference output's length minus the model's (characters) and difficulty_i is the
instruction's fixed effect (how hard it is to beat the baseline on it). The LC win rate is the mean
prediction with the length term set to zero: what the judge would have said had both outputs been
equally long. Without difficulties the term is left out (AlpacaEval's `length_controlled_minimal`).
AlpacaEval's default also regularises the fit towards two "gamed" baselines whose annotations live on a
model hub; that part is not reproduced here (it is their `length_controlled_noreg` GLM).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["GlmFit", "WinRate", "fit_length_controlled", "win_rate"]

# Newton's method on a 3-parameter convex problem converges in a handful of steps; these are guards.
MAX_NEWTON_STEPS = 100
TOLERANCE = 1e-10
# A weak L2 penalty on the summed log loss, in place of AlpacaEval's cross-validated L1 penalty: it keeps
# the weights finite when the length term is nearly constant (every output far shorter than the
# reference's, so length and model terms are collinear), and moves the LC win rate of the 805-judgment
# fixtures in tests/data by less than 0.03 points.
RIDGE = 0.1


@dataclass(frozen=True)
class WinRate:
    """Raw win rate (percent) with its standard error, and the counts behind it."""

    win_rate: float
    standard_error: float | None
    n_total: int
    n_wins: int
    n_draws: int
    n_losses: int
    discrete_win_rate: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class GlmFit:
    """The length-controlled win rate (percent), its standard error, and the fitted weights."""

    lc_win_rate: float
    lc_standard_error: float | None
    weights: dict[str, float]
    glm: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _sem(values: NDArray[np.float64]) -> float | None:
    """Standard error of the mean, in the units of `values`; None for fewer than two values."""
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None


def _percent(value: float | None) -> float | None:
    return None if value is None else value * 100


def win_rate(preferences: Sequence[float]) -> WinRate:
    """Win rate of the model over the reference from preferences in [0, 1] (1: the model's output wins)."""
    p = np.asarray(preferences, dtype=float)
    if not len(p):
        raise ValueError("no preferences to compute a win rate from")
    wins, draws = int((p > 0.5).sum()), int((p == 0.5).sum())
    return WinRate(
        win_rate=float(p.mean() * 100),
        standard_error=_percent(_sem(p)),
        n_total=len(p),
        n_wins=wins,
        n_draws=draws,
        n_losses=len(p) - wins - draws,
        discrete_win_rate=(wins + draws / 2) / len(p) * 100,
    )


def _sigmoid(x: NDArray[np.float64]) -> NDArray[np.float64]:
    result: NDArray[np.float64] = np.exp(-np.logaddexp(0.0, -x))
    return result


def _fit_logistic(features: NDArray[np.float64], target: NDArray[np.float64]) -> NDArray[np.float64]:
    """Weights of a weakly L2-penalised logistic regression with soft targets in [0, 1] (Newton steps)."""
    weights = np.zeros(features.shape[1])
    for _ in range(MAX_NEWTON_STEPS):
        predicted = _sigmoid(features @ weights)
        gradient = features.T @ (predicted - target) + RIDGE * weights
        curvature = predicted * (1 - predicted)
        hessian = features.T @ (features * curvature[:, None]) + RIDGE * np.eye(features.shape[1])
        step = np.linalg.solve(hessian, gradient)
        weights = weights - step
        if np.abs(step).max() < TOLERANCE:
            break
    return weights


def fit_length_controlled(
    preferences: Sequence[float],
    model_lengths: Sequence[int],
    reference_lengths: Sequence[int],
    difficulties: Sequence[float] | None = None,
) -> GlmFit:
    """AlpacaEval 2.0's length-controlled win rate of the model over the reference (see the module doc).

    `preferences` are in [0, 1] (1: the model's output wins); lengths are in characters; `difficulties`
    are the instructions' fixed effects, or None to leave that term out.
    """
    target = np.asarray(preferences, dtype=float)
    if len(target) < 2:
        raise ValueError("the length-controlled win rate needs at least two judgments")
    delta = np.asarray(reference_lengths, dtype=float) - np.asarray(model_lengths, dtype=float)
    spread = delta.std(ddof=1)
    length_term = np.tanh(delta / spread) if spread > 0 else np.zeros_like(delta)
    columns = {"length": length_term}
    if difficulties is not None:
        columns["instruction_difficulty"] = np.asarray(difficulties, dtype=float)
    columns["model"] = np.ones_like(target)
    features = np.column_stack(list(columns.values()))
    weights = _fit_logistic(features, target)
    # The counterfactual: every output as long as the reference's.
    neutral = features.copy()
    neutral[:, 0] = 0.0
    predicted = _sigmoid(neutral @ weights)
    return GlmFit(
        lc_win_rate=float(predicted.mean() * 100),
        lc_standard_error=_percent(_sem(predicted)),
        weights={name: float(w) for name, w in zip(columns, weights, strict=True)},
        glm="length_controlled_noreg" if difficulties is not None else "length_controlled_minimal",
    )
