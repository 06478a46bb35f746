"""Bootstrap standard errors and paired comparisons (numbers with known answers)."""

from __future__ import annotations

import math
import random

import pytest

from evomerge.fitness.uncertainty import paired_difference, standard_error


def mean(values):
    return sum(values) / len(values)


def test_the_standard_error_of_a_mean_is_sd_over_root_n() -> None:
    rng = random.Random(1)
    values = [float(rng.random() < 0.3) for _ in range(400)]
    sd = math.sqrt(mean([(v - mean(values)) ** 2 for v in values]))
    assert standard_error(values, mean) == pytest.approx(sd / math.sqrt(len(values)), rel=0.08)
    assert math.isnan(standard_error([1.0], mean))


def test_a_paired_comparison_sees_a_small_consistent_gain_that_unpaired_noise_hides() -> None:
    rng = random.Random(2)
    hard = [rng.gauss(0, 1) for _ in range(300)]  # what the two models share: hard examples
    b = {"t": hard}
    a = {"t": [x + 0.05 for x in hard]}  # the same examples, each a little better

    def combine(per_task):
        return per_task["t"]

    out = paired_difference(a, b, {"t": mean}, combine)
    assert out["difference"] == pytest.approx(0.05)
    assert out["se"] < 1e-9 and out["p_not_better"] == 0.0
    # unpaired, the gain is far inside the noise of either score
    assert standard_error(hard, mean) > 0.05


def test_no_real_difference_is_not_called_a_gain() -> None:
    rng = random.Random(3)
    a = {"t": [float(rng.random() < 0.5) for _ in range(300)]}
    b = {"t": [float(rng.random() < 0.5) for _ in range(300)]}
    out = paired_difference(a, b, {"t": mean}, lambda p: p["t"])
    assert abs(out["difference"]) < 2.5 * out["se"]
    assert 0.02 < out["p_not_better"] < 0.98


def test_tasks_combine_with_their_weights_and_any_aggregation() -> None:
    a = {"acc": [1.0, 1.0, 0.0, 1.0], "ll": [-1.0, -2.0, -1.5, -1.0]}
    b = {"acc": [1.0, 0.0, 0.0, 1.0], "ll": [-1.0, -2.0, -1.5, -1.0]}

    def perplexity(lls):
        return math.exp(-mean(lls))

    def combine(p):  # perplexity minimised: negated
        return (2 * p["acc"] - p["ll"]) / 3

    out = paired_difference(a, b, {"acc": mean, "ll": perplexity}, combine)
    assert out["difference"] == pytest.approx(2 * 0.25 / 3)
    with pytest.raises(ValueError, match="different examples"):
        paired_difference({"acc": [1.0]}, {"acc": [1.0, 0.0]}, {"acc": mean}, lambda p: p["acc"])
