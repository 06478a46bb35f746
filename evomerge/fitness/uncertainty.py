"""How sure a score is: bootstrap standard errors and paired comparisons over examples.

Every task's score is an aggregation (a mean, a perplexity, ...) of per-example values, so its
noise is estimated by resampling the examples: draw n of the n examples with replacement, take
the task's own aggregation, repeat, and the spread of the results is the standard error. Two
models scored on the same examples are compared *paired*: each draw takes the same examples
for both, so the error of the difference excludes what the two share (which examples are hard).
The combined fitness is resampled task by task (tasks are independent samples).

    se = standard_error(values, aggregate)
    diff = paired_difference({task: values_a}, {task: values_b}, aggregates, combine)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

DRAWS = 2000
SEED = 0  # fixed: the same scores give the same report

Aggregate = Callable[[Sequence[float]], float]


def _draws(n: int, rng: np.random.Generator, draws: int) -> np.ndarray:
    return rng.integers(0, n, size=(draws, n))


def _aggregate_rows(values: np.ndarray, rows: np.ndarray, aggregate: Aggregate) -> np.ndarray:
    return np.array([aggregate(values[r].tolist()) for r in rows])


def standard_error(values: Sequence[float], aggregate: Aggregate, *, draws: int = DRAWS) -> float:
    """Bootstrap standard error of `aggregate(values)` (for a mean: about sd / sqrt(n))."""
    if len(values) < 2:
        return math.nan
    rows = _draws(len(values), np.random.default_rng(SEED), draws)
    return float(np.std(_aggregate_rows(np.asarray(values, dtype=float), rows, aggregate), ddof=1))


def paired_difference(
    a: dict[str, Sequence[float]],
    b: dict[str, Sequence[float]],
    aggregates: dict[str, Aggregate],
    combine: Callable[[dict[str, float]], float],
    *,
    draws: int = DRAWS,
) -> dict[str, float]:
    """`combine(a) - combine(b)` over the same resampled examples of each task.

    Returns the difference on the real examples, its standard error, and `p_not_better`: the
    share of draws in which `a` does not beat `b` (a one-sided bootstrap p-value)."""
    rng = np.random.default_rng(SEED)
    per_task_a, per_task_b = {}, {}
    for task, aggregate in aggregates.items():
        va, vb = np.asarray(a[task], dtype=float), np.asarray(b[task], dtype=float)
        if va.shape != vb.shape:
            raise ValueError(f"{task}: the two scorings cover different examples")
        rows = _draws(len(va), rng, draws)
        per_task_a[task] = _aggregate_rows(va, rows, aggregate)
        per_task_b[task] = _aggregate_rows(vb, rows, aggregate)
    differences = np.array(
        [
            combine({t: float(v[i]) for t, v in per_task_a.items()})
            - combine({t: float(v[i]) for t, v in per_task_b.items()})
            for i in range(draws)
        ]
    )
    observed = combine({t: aggregates[t](list(a[t])) for t in aggregates}) - combine(
        {t: aggregates[t](list(b[t])) for t in aggregates}
    )
    return {
        "difference": float(observed),
        "se": float(np.std(differences, ddof=1)),
        "p_not_better": float(np.mean(differences <= 0)),
    }
