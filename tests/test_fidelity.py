"""Multi-fidelity over examples: the rung schedule, the stopping rule, and scoring rung by rung
on a live model with real lm-eval (every example once, the last rung equal to a full score)."""

from __future__ import annotations

import copy
import math

import pytest

from evomerge.errors import UserError
from evomerge.fitness.tasks import TaskSet
from evomerge.pool import load_manifest
from evomerge.search.config import RunConfig
from evomerge.search.fidelity import RUNGS_ATTR, Schedule, read_examples, rung_sizes, write_examples

ADD, SORT = "evomerge_add", "evomerge_sort"


def run_config(subset=None, fidelity="default") -> RunConfig:
    data = {
        "pool": {"base": "base", "models": {"a": "a"}},
        "space": "linear_global",
        "fitness": {"tasks": [ADD, SORT], **({"subset": subset} if subset else {})},
    }
    if fidelity != "default":
        data["search"] = {"fidelity": fidelity}
    return RunConfig.model_validate(data)


def task_set(n_docs: dict[str, int], subset: dict[str, list[int]] | None) -> TaskSet:
    return TaskSet(specs=[], task_dict={}, maximize={}, n_docs=n_docs, subset=subset)


def finished(rungs: list[float]):
    import optuna
    from optuna.distributions import FloatDistribution

    return optuna.trial.create_trial(
        params={"x": 0.5},
        distributions={"x": FloatDistribution(0, 1)},
        value=rungs[-1],
        user_attrs={RUNGS_ATTR: rungs},
    )


@pytest.mark.parametrize(
    "first, n, eta, sizes",
    [
        (16, 150, 3, [16, 48, 150]),  # 144 would leave a sliver of 6: all of it instead
        (50, 150, 3, [50, 150]),
        (10, 150, 3, [10, 30, 150]),  # 90 would leave a last step under eta
        (150, 150, 3, [150]),  # the subset is everything: one rung
        (1, 10, 1.2, [1, 2, 3, 4, 5, 6, 7, 10]),  # rounding never repeats a rung
    ],
)
def test_rungs_grow_by_eta_and_end_with_every_example(first, n, eta, sizes):
    assert [r["t"] for r in rung_sizes({"t": first}, {"t": n}, eta)] == sizes


def test_a_smaller_task_is_scored_whole_once_the_rungs_pass_it():
    sizes = rung_sizes({"a": 10, "b": 5}, {"a": 100, "b": 12}, 3)
    assert sizes == [{"a": 10, "b": 5}, {"a": 30, "b": 12}, {"a": 100, "b": 12}]


def test_the_first_rung_is_the_fitness_subset_and_every_order_a_permutation():
    config = run_config(subset={"count": 4, "sampling": "random", "seed": 1})
    subset = {ADD: [3, 5, 8, 9], SORT: [0, 1, 2, 7]}
    schedule = Schedule.of(config, task_set({ADD: 20, SORT: 10}, subset))
    for task, n in ((ADD, 20), (SORT, 10)):
        assert schedule.orders[task][:4] == subset[task]
        assert sorted(schedule.orders[task]) == list(range(n))
    assert schedule.sizes == [{ADD: 4, SORT: 4}, {ADD: 20, SORT: 10}]
    # the same config gives the same orders: trials of one run (and its workers) compare
    assert Schedule.of(config, task_set({ADD: 20, SORT: 10}, subset)) == schedule


def test_without_subset_or_with_fidelity_null_every_trial_scores_all_of_dev():
    for config, subset in (
        (run_config(), None),
        (run_config({"count": 4}, fidelity=None), {ADD: [0, 1, 2, 3], SORT: [0, 1, 2, 3]}),
    ):
        schedule = Schedule.of(config, task_set({ADD: 20, SORT: 10}, subset))
        assert schedule.sizes == [{ADD: 20, SORT: 10}]


def test_a_subset_larger_than_a_task_is_refused():
    config = run_config(subset={"count": 12})
    with pytest.raises(
        UserError,
        match=r"fitness.subset.count 12 is more than the 10 dev examples of 'evomerge_sort'"
        r".*fidelity: null",
    ):
        Schedule.of(
            config, task_set({ADD: 20, SORT: 10}, {ADD: list(range(12)), SORT: list(range(10))})
        )


@pytest.mark.parametrize("eta", [1, 0.5, 0])
def test_eta_of_one_or_less_is_refused(eta):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="greater than 1"):
        run_config(subset={"count": 4}, fidelity={"eta": eta})


def test_promotion_is_refused_with_what_to_write_instead():
    from pydantic import ValidationError

    with pytest.raises(
        ValidationError, match=r"search.promotion was replaced by search.fidelity.*fidelity: null"
    ):
        RunConfig.model_validate(
            {
                "pool": {"base": "b", "models": {"a": "a"}},
                "space": "linear_global",
                "fitness": {"tasks": [ADD]},
                "search": {"promotion": {"quantile": 0.5}},
            }
        )


def test_a_trial_goes_on_while_in_the_top_third_and_level_with_the_incumbent():
    schedule = Schedule(orders={}, sizes=[{}, {}, {}], eta=3)
    assert schedule.goes_on(0, 0.1, peers=[])  # the first at a rung always goes on
    peers = [
        finished([v, v]) for v in (0.5, 0.6, 0.7, 0.8, 0.9)
    ]  # with it, six values: top two go on
    assert schedule.goes_on(0, 0.85, peers) and schedule.goes_on(0, 0.95, peers)
    assert not schedule.goes_on(0, 0.75, peers)
    assert schedule.goes_on(1, 0.8, peers[:1])  # while n < eta: the best goes on
    assert not schedule.goes_on(1, 0.4, peers[:1])
    incumbent = finished([0.9, 0.7, 0.6])
    # at the top of its rung, but below what the incumbent scored on the same examples
    assert not schedule.goes_on(0, 0.88, peers[:1], incumbent)
    assert schedule.goes_on(0, 0.9, peers[:1], incumbent)


@pytest.mark.slow
def test_rung_by_rung_scores_each_example_once_and_ends_at_the_full_score(
    small_pool, small_pool_models, tmp_path
):
    from evomerge.fitness import Evaluator

    live = copy.deepcopy(small_pool_models["add"])
    config = run_config(subset={"count": 10, "sampling": "random", "seed": 0})
    fitness = config.fitness.model_copy(
        update={
            "task_paths": [load_manifest(small_pool)["task_path"]],
            "tasks": [
                config.fitness.tasks[0],
                config.fitness.tasks[1].model_copy(update={"metric": "perplexity"}),
            ],
        }
    )
    config = config.model_copy(update={"fitness": fitness})
    evaluator = Evaluator(live, small_pool_models["tokenizer"], fitness, tmp_path)
    schedule = Schedule.of(config, evaluator.tasks)
    assert len(schedule.sizes) > 2

    scored = schedule.score(evaluator, peers=[], to_the_end=True)
    full = evaluator.score(full=True)
    assert scored.full and len(scored.rungs) == len(schedule.sizes)
    for task, n in evaluator.tasks.n_docs.items():
        assert sorted(scored.docs[task]) == list(range(n))  # every example, none twice
    assert scored.per_task == pytest.approx(full.per_task)
    assert scored.value == pytest.approx(full.value)

    # a trial below the incumbent at the first rung stops there, having scored only rung 0
    incumbent = finished([math.inf] + scored.rungs[1:])
    stopped = schedule.score(evaluator, peers=[incumbent], incumbent=incumbent)
    assert not stopped.full and stopped.rungs == scored.rungs[:1]
    assert stopped.examples == sum(schedule.sizes[0].values())

    write_examples(tmp_path, 7, stopped)
    kept = read_examples(tmp_path, 7)
    assert kept == {t: {"docs": stopped.docs[t], "values": stopped.values[t]} for t in stopped.docs}
    assert read_examples(tmp_path, 8) is None
    assert not list((tmp_path / "examples").glob(".*"))  # no temporary file left
