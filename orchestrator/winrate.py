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

The fit is the `alpaca-eval` package's, step for step: an L1-penalised logistic regression on soft
targets (each judgment counts as a win with weight p and a loss with weight 1 - p), its penalty chosen
from ten strengths by 5-fold cross-validated log loss and refitted on every judgment, each fit solved as
liblinear solves it (newGLMNET: Newton steps, each a coordinate descent in a seeded random order, stopped
at liblinear's tolerance). The solver is reproduced on purpose, not replaced by an exact one: liblinear
stops short of the optimum, and on AlpacaEval's published judgments of 51 models the exact optimum
moves the LC win rate by up to 0.06 points, an unshuffled coordinate order by up to 0.16.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["GlmFit", "WinRate", "fit_length_controlled", "win_rate"]

# AlpacaEval fits scikit-learn's LogisticRegressionCV(penalty="l1", solver="liblinear", random_state=123,
# fit_intercept=False) with GroupKFold(5): these are its settings. STRENGTHS is the default grid of C (it
# multiplies the summed log loss; the L1 norm is added unscaled), SEED makes the solver's coordinate
# orders, TOLERANCE and MAX_NEWTON_STEPS are `tol` and `max_iter`.
STRENGTHS = np.logspace(-4, 4, 10)
N_FOLDS = 5
SEED = 123
TOLERANCE = 1e-4
MAX_NEWTON_STEPS = 100
# liblinear's own constants for L1-regularised logistic regression (newGLMNET).
MAX_SWEEPS = 1000  # coordinate-descent sweeps per Newton step
MAX_HALVINGS = 20  # line-search steps
SUFFICIENT_DECREASE = 0.01
NU = 1e-12  # added to every curvature, so that none is zero
MIN_MOVE = 1e-12  # a coordinate move smaller than this is skipped
MAX_MOVE = 10.0
# Predictions are clipped before the log loss that scores a fold, as AlpacaEval's scorer does.
CLIP = 1e-15


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


class _CoordinateOrder:
    """liblinear's shuffles as scikit-learn builds it: a 32-bit Mersenne Twister seeded with `seed`, whose
    raw stream numpy's legacy RandomState reproduces, bounded to a range by Lemire's method."""

    def __init__(self, seed: int) -> None:
        self._source = np.random.RandomState(seed)
        self._drawn: list[int] = []

    def draw(self) -> int:
        """The generator's next raw 32-bit output."""
        if not self._drawn:
            self._drawn = self._source.randint(0, 2**32, size=1024, dtype=np.uint32).tolist()[::-1]
        return self._drawn.pop()

    def shuffle(self, order: list[int], size: int) -> None:
        """Shuffle order[:size] in place (Fisher-Yates from the front)."""
        for j in range(size):
            n = size - j
            # Lemire: the high word of draw * n, drawn again while the low word falls in the biased zone.
            product = self.draw() * n
            while product & 0xFFFFFFFF < 2**32 % n:
                product = self.draw() * n
            i = j + (product >> 32)
            order[i], order[j] = order[j], order[i]


def _violation(gradient: float, weight: float) -> float:
    """How far zero is from the subdifferential of loss + |w| in one coordinate."""
    if weight == 0:
        return max(abs(gradient) - 1, 0.0)
    return abs(gradient + math.copysign(1.0, weight))


def _idle(gradient: float, weight: float, worst: float, n: int) -> bool:
    """Whether a zero weight is left out for now: its gradient lies well inside [-1, 1]."""
    return weight == 0 and -1 + worst / n < gradient < 1 - worst / n


def _newton_direction(
    gradient: list[float],
    hessian: list[list[float]],
    weights: list[float],
    proposal: list[float],
    order: list[int],
    active: int,
    enough: float,
    shuffler: _CoordinateOrder,
    n: int,
) -> tuple[list[float], int, bool]:
    """liblinear's inner loop: coordinate descent on the quadratic model of loss + |w|_1 around `weights`,
    starting from `proposal`, until a sweep's summed violation is at most `enough`.

    Moves `proposal` (and reorders `order`) in place; returns the moves made, the number of sweeps, and
    whether any coordinate moved at all.
    """
    moved = [0.0] * len(weights)
    coupling = [0.0] * len(weights)  # hessian @ moved
    sweeps, size, worst_before, changed = 0, active, math.inf, False
    while sweeps < MAX_SWEEPS:
        worst, total = 0.0, 0.0
        shuffler.shuffle(order, size)
        s = 0
        while s < size:
            j = order[s]
            here = proposal[j]
            g = gradient[j] + (here - weights[j]) * NU + coupling[j]
            # _idle and _violation, inlined: this loop runs up to 100,000 times in one fit.
            if here == 0:
                if -1 + worst_before / n < g < 1 - worst_before / n:
                    size -= 1
                    order[s], order[size] = order[size], order[s]
                    continue
                violation = max(abs(g) - 1, 0.0)
            else:
                violation = abs(g + 1) if here > 0 else abs(g - 1)
            s += 1
            h = hessian[j][j] + NU
            # The minimiser of g * move + h * move^2 / 2 + |here + move|.
            move = -(g + 1) / h if g + 1 < h * here else -(g - 1) / h if g - 1 > h * here else -here
            if -MIN_MOVE < move < MIN_MOVE:
                continue
            move = min(max(move, -MAX_MOVE), MAX_MOVE)
            if violation > worst:
                worst = violation
            total += violation
            changed = True
            proposal[j] = here + move
            moved[j] += move
            for i, row in enumerate(hessian):
                coupling[i] += row[j] * move
        sweeps += 1
        if total <= enough:
            if size == active:
                break
            size, worst_before = active, math.inf  # check the left-out coordinates again
            continue
        worst_before = worst
    return moved, sweeps, changed


def _fit_l1_logistic(
    features: NDArray[np.float64], target: NDArray[np.float64], strength: float, seed: int
) -> NDArray[np.float64]:
    """Weights for |w|_1 + strength * (log loss against soft targets), where liblinear's newGLMNET stops.

    Each judgment is two weighted instances: a win (weight = target) and a loss (weight = 1 - target);
    liblinear drops those of weight zero, and its tolerance scales with how many wins and losses remain.
    """
    wins, losses = target > 0, target < 1
    x = np.vstack([features[losses], features[wins]])
    won = np.concatenate([np.zeros(int(losses.sum())), np.ones(int(wins.sum()))])
    cost = strength * np.concatenate([1 - target[losses], target[wins]])
    n, n_weights = x.shape
    tolerance = TOLERANCE * max(min(int(wins.sum()), int(losses.sum())), 1) / n
    shuffler, order = _CoordinateOrder(seed), list(range(n_weights))
    weights, proposal, margin = np.zeros(n_weights), np.zeros(n_weights), np.zeros(n)
    first_total, worst_before, inner_scale = 0.0, math.inf, 1.0
    unmoved = 0  # Newton steps in a row whose coordinate descent moved nothing; ten end the fit

    def loss(z: NDArray[np.float64]) -> NDArray[np.float64]:
        result: NDArray[np.float64] = cost * np.logaddexp(0.0, np.where(won > 0, -z, z))
        return result

    for step in range(MAX_NEWTON_STEPS):
        predicted = _sigmoid(margin)
        gradient = x.T @ (cost * (predicted - won))
        hessian = (x * (cost * predicted * (1 - predicted))[:, None]).T @ x
        # Optimality over the coordinates still in play; zero weights deep inside [-1, 1] sit this out.
        active, worst, total, s = n_weights, 0.0, 0.0, 0
        while s < active:
            j = order[s]
            if _idle(gradient[j], weights[j], worst_before, n):
                active -= 1
                order[s], order[active] = order[active], order[s]
                continue
            violation = _violation(gradient[j], weights[j])
            worst, total, s = max(worst, violation), total + violation, s + 1
        if step == 0:
            first_total = total
        if total <= tolerance * first_total or unmoved >= 10:
            break
        moving = proposal.tolist()
        moved, sweeps, changed = _newton_direction(
            gradient.tolist(),
            hessian.tolist(),
            weights.tolist(),
            moving,
            order,
            active,
            inner_scale * first_total,
            shuffler,
            n,
        )
        unmoved = 0 if changed else unmoved + 1
        proposal, shift = np.array(moving), x @ np.array(moved)
        # Backtrack towards the current weights until the objective falls enough.
        norm = float(np.abs(weights).sum())
        decrease = float(gradient @ (proposal - weights)) + float(np.abs(proposal).sum()) - norm
        for _ in range(MAX_HALVINGS):
            change = float(np.abs(proposal).sum()) - norm + float((loss(margin + shift) - loss(margin)).sum())
            if change <= SUFFICIENT_DECREASE * decrease:
                weights, margin = proposal.copy(), margin + shift
                break
            proposal, decrease, shift = (weights + proposal) / 2, decrease / 2, shift / 2
        if sweeps == 1:
            inner_scale /= 4
        worst_before = worst
    return weights


def _fold_of_each_row(n_rows: int) -> NDArray[np.int64]:
    """Cross-validation fold of each row: dealt out from the last row, one fold after another.

    That is how scikit-learn's GroupKFold splits groups of equal size (each judgment is a group of two
    instances in AlpacaEval's fit). With fewer rows than folds, where the package refuses, every row is
    its own fold.
    """
    return (n_rows - 1 - np.arange(n_rows)) % min(N_FOLDS, n_rows)


def _validation_loss(
    features: NDArray[np.float64], target: NDArray[np.float64], weights: NDArray[np.float64]
) -> float:
    """Mean log loss of the clipped predictions against soft targets: the score of one fold."""
    predicted = np.clip(_sigmoid(features @ weights), CLIP, 1 - CLIP)
    return float(-(target * np.log(predicted) + (1 - target) * np.log(1 - predicted)).mean())


def _fit_cross_validated(features: NDArray[np.float64], target: NDArray[np.float64]) -> NDArray[np.float64]:
    """Weights refitted on every row at the strength whose folds' summed validation loss is least (the
    first of equal ones: the strongest penalty)."""
    # scikit-learn seeds liblinear afresh for every fit along a path of strengths, from a generator
    # seeded with SEED at the start of each path; the refit is a path of one.
    seeds = np.random.RandomState(SEED).randint(np.iinfo(np.int32).max, size=len(STRENGTHS))
    folds = _fold_of_each_row(len(target))
    losses = np.zeros(len(STRENGTHS))
    for fold in np.unique(folds):
        train, test = folds != fold, folds == fold
        for k, strength in enumerate(STRENGTHS):
            weights = _fit_l1_logistic(features[train], target[train], float(strength), int(seeds[k]))
            losses[k] += _validation_loss(features[test], target[test], weights)
    return _fit_l1_logistic(features, target, float(STRENGTHS[int(np.argmin(losses))]), int(seeds[0]))


def fit_length_controlled(
    preferences: Sequence[float],
    model_lengths: Sequence[int],
    reference_lengths: Sequence[int],
    difficulties: Sequence[float] | None = None,
) -> GlmFit:
    """AlpacaEval 2.0's length-controlled win rate of the model over the reference (see the module doc).

    `preferences` are in [0, 1] (1: the model's output wins); lengths are in characters; `difficulties`
    are the instructions' fixed effects, or None to leave that term out. 805 judgments take about a
    tenth of a second; a few judgments whose length term is nearly constant can take a second or more,
    since liblinear then runs to its iteration caps.
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
    weights = _fit_cross_validated(features, target)
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
