"""The samplers on a cheap objective with real Optuna studies in real SQLite storage.

The objective is a smooth bowl over 6 genes in [0, 1] whose peak lies far from the box centre,
so "CMA-ES started from the best of the design" and "CMA-ES started from the centre" propose
visibly different genomes.
"""

from __future__ import annotations

import math

import optuna
import pytest

from evomerge.search.samplers import CMA_GENERATION, WarmStartedCmaEs, design_trials, make_sampler

GENES = [f"g{i}" for i in range(6)]
PEAK = {"g0": 0.9, "g1": 0.1, "g2": 0.85, "g3": 0.15, "g4": 0.9, "g5": 0.1}
BASELINES = [  # as the search queues them: uniform, then each gene's corner
    {g: 0.5 for g in GENES},
    {g: 1.0 if g in ("g0", "g2", "g4") else 0.0 for g in GENES},
]

optuna.logging.set_verbosity(optuna.logging.WARNING)


def fitness(trial: optuna.Trial) -> float:
    genome = {g: trial.suggest_float(g, 0.0, 1.0) for g in GENES}
    return -sum((genome[g] - PEAK[g]) ** 2 for g in GENES)


def open_study(path, sampler, *, create: bool) -> optuna.Study:
    storage = f"sqlite:///{path}"
    if create:
        study = optuna.create_study(
            storage=storage, study_name="s", sampler=sampler, direction="maximize"
        )
        for genome in BASELINES:
            study.enqueue_trial(genome, user_attrs={"baseline": "b"})
        return study
    return optuna.load_study(storage=storage, study_name="s", sampler=sampler)


def distance(params: dict, point: dict) -> float:
    return math.sqrt(sum((params[g] - point[g]) ** 2 for g in GENES))


def test_every_named_sampler_runs_a_seeded_study_reproducibly(tmp_path) -> None:
    from evomerge.search.samplers import SAMPLERS

    assert {"gp", "cmaes", "cmaes_warm", "tpe", "random"} <= set(SAMPLERS)
    for name in SAMPLERS:
        runs = []
        for attempt in range(2):
            study = open_study(
                tmp_path / f"{name}-{attempt}.db",
                make_sampler(name, seed=1, trials=12),
                create=True,
            )
            study.optimize(fitness, n_trials=12)
            runs.append([t.params for t in study.trials])
        assert runs[0] == runs[1], name
        assert runs[0][:2] == BASELINES, name  # the queued baselines come first


def test_design_size_rule() -> None:
    assert design_trials(20) == 10 and design_trials(50) == 16 and design_trials(1000) == 50


def test_warm_cmaes_starts_from_the_best_of_the_design_not_the_centre(tmp_path) -> None:
    n_design, population = 12, 9  # 6 genes: CMA-ES's population is 4 + 3 ln 6 ~ 9
    study = open_study(
        tmp_path / "warm.db",
        WarmStartedCmaEs(
            design=make_sampler("gp", seed=0, trials=0), design_trials=n_design, seed=0
        ),
        create=True,
    )
    study.optimize(fitness, n_trials=n_design + population)
    design = study.trials[:n_design]
    generation0 = study.trials[n_design:]
    assert all(CMA_GENERATION not in t.system_attrs for t in design)
    assert [t.system_attrs[CMA_GENERATION] for t in generation0] == [0] * population
    best = max(design, key=lambda t: t.value).params
    centre = {g: 0.5 for g in GENES}
    mean = {g: sum(t.params[g] for t in generation0) / population for g in GENES}
    # around the best design point, with a step near 0.1 of each range (CMA-ES from the centre
    # would average near 0.5 with a step of 1/6)
    assert distance(mean, best) < 0.25 < distance(mean, centre)
    spread = max(distance(t.params, best) for t in generation0)
    assert spread < 0.6


def test_plain_cmaes_ignores_the_design_and_starts_at_the_centre(tmp_path) -> None:
    study = open_study(tmp_path / "plain.db", make_sampler("cmaes", seed=0, trials=0), create=True)
    study.optimize(fitness, n_trials=2 + 9)
    generation0 = study.trials[2:]
    mean = {g: sum(t.params[g] for t in generation0) / len(generation0) for g in GENES}
    assert distance(mean, {g: 0.5 for g in GENES}) < 0.2  # the contrast the warm start fixes


@pytest.mark.parametrize("split_at", [10, 14])  # in the design; in CMA-ES's first generation
def test_warm_cmaes_resumes_from_storage(tmp_path, split_at: int) -> None:
    """Stop, then continue in a fresh sampler (a new process: unseeded): the design, the warm
    start and the CMA-ES generations carry on from what storage holds."""
    total, n_design = 30, design_trials(30)
    path = tmp_path / "study.db"
    first = open_study(path, make_sampler("cmaes_warm", seed=0, trials=total), create=True)
    first.optimize(fitness, n_trials=split_at)
    resumed = open_study(path, make_sampler("cmaes_warm", seed=None, trials=total), create=False)
    resumed.optimize(fitness, n_trials=total - split_at)

    trials = resumed.trials
    generations = [t.system_attrs.get(CMA_GENERATION) for t in trials]
    assert generations[:n_design] == [None] * n_design
    assert generations[n_design:] == [0] * 9 + [1] * 9 + [2] * 2
    # generation 1 was asked from the optimizer stored in storage after generation 0's tell
    stored = [t for t in trials if any(k.startswith("cma:optimizer") for k in t.system_attrs)]
    assert [t.number for t in stored] == [n_design + 9, n_design + 18]
    # the warm start holds across the restart: generation 0 sits around the design's best
    best = max(trials[:n_design], key=lambda t: t.value).params
    generation0 = trials[n_design : n_design + 9]
    mean = {g: sum(t.params[g] for t in generation0) / 9 for g in GENES}
    assert distance(mean, best) < 0.25 < distance(mean, {g: 0.5 for g in GENES})


def test_warm_cmaes_with_two_workers_shares_one_cmaes_state(tmp_path) -> None:
    """Two workers (two sampler objects, unseeded as joiners are) take turns on one study: one
    run of generations, each told once, whichever worker asked its trials."""
    path = tmp_path / "study.db"
    workers = [
        open_study(path, make_sampler("cmaes_warm", seed=0, trials=30), create=True),
        open_study(path, make_sampler("cmaes_warm", seed=None, trials=30), create=False),
    ]
    for i in range(30):
        workers[i % 2].optimize(fitness, n_trials=1)
    trials = workers[0].trials
    generations = [t.system_attrs.get(CMA_GENERATION) for t in trials]
    n_design = design_trials(30)
    assert generations[n_design:] == [0] * 9 + [1] * 9 + [2] * 2
    tells = [t.number for t in trials if any(k.startswith("cma:optimizer") for k in t.system_attrs)]
    assert tells == [n_design + 9, n_design + 18]
    assert max(t.value for t in trials[n_design:]) >= max(t.value for t in trials[:n_design])


@pytest.mark.parametrize("name,observes", [("gp", True), ("tpe", True), ("random", False)])
def test_queued_baselines_are_observations(name: str, observes: bool) -> None:
    """The same queued genomes scored by two different objectives: a sampler that learns from
    them proposes differently next; random search does not look."""
    other_peak = {g: 1.0 - v for g, v in PEAK.items()}
    proposals = []
    for peak in (PEAK, other_peak):
        study = optuna.create_study(
            sampler=make_sampler(name, seed=0, trials=0), direction="maximize"
        )
        for i in range(10):
            study.enqueue_trial(
                {g: 0.5 + 0.4 * math.sin(7.0 * (i + 1) * (j + 1)) for j, g in enumerate(GENES)}
            )
        study.optimize(
            lambda t, peak=peak: -sum((t.suggest_float(g, 0.0, 1.0) - peak[g]) ** 2 for g in GENES),
            n_trials=11,
        )
        proposals.append(study.trials[10].params)
    assert (proposals[0] != proposals[1]) == observes


@pytest.mark.slow
def test_resume_continues_a_warm_cmaes_search_on_a_real_pool(tmp_path, small_pool) -> None:
    """`evomerge search` stopped inside CMA-ES's first generation, then `evomerge resume` in a
    new process: the design (baselines + GP) is kept, and CMA-ES goes on from the warm start."""
    from test_search import evomerge, trials_of, write_config

    run_dir = tmp_path / "run"
    config = write_config(tmp_path, small_pool, trials=12, sampler="cmaes_warm")  # design: 10
    evomerge("search", str(config), "--run-dir", str(run_dir))
    evomerge("resume", str(run_dir), "--trials", "5")
    trials = trials_of(run_dir)
    assert [t.user_attrs.get("baseline") for t in trials[:4]] == [
        "uniform",
        "only_add",
        "only_rev",
        "only_sort",
    ]
    # linear_global over 3 models: 3 genes, population 7; trials 10-16 are generation 0
    assert [t.system_attrs.get(CMA_GENERATION) for t in trials] == [None] * 10 + [0] * 7
    design = [t for t in trials[:10] if t.user_attrs.get("fidelity") == "full"]
    best = max(design, key=lambda t: t.value).params
    mean = {g: sum(t.params[g] for t in trials[10:]) / 7 for g in best}
    assert math.dist(list(mean.values()), list(best.values())) < 0.3
