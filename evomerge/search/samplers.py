"""Samplers: how a study proposes the next genome (`search.sampler` in the run config).

- `gp`         Gaussian-process Bayesian optimisation (Optuna's `GPSampler`): a surrogate of
               the fitness fitted to every finished trial, the queued baselines included, and
               the next genome chosen where expected improvement is highest. Built for small
               budgets; its cost per proposal grows with the number of trials (about 0.1-0.2 s
               at 50 trials; `greenlet`, a dependency, lets Optuna optimise the acquisition
               function in batches, about 2x faster than without).
- `cmaes`      CMA-ES (Optuna's `CmaEsSampler`) from the centre of the box, step 1/6 of each
               range. Cheap per proposal and good with large budgets and many workers; it
               ignores every trial outside its own generations, the baselines included.
- `cmaes_warm` CMA-ES warm-started from an initial design: the first `design_trials` finished
               trials (the baselines, then GP proposals) are the source of Optuna's warm start
               (`source_trials`, WS-CMA-ES: the search starts at the mean of the best tenth of
               the design, with a spread of about 0.1 of each gene's range), then CMA-ES
               carries on. See `WarmStartedCmaEs`.
- `tpe`        multivariate TPE; `random`, uniform draws.

What each sampler can do (draw categorical genes, search several objectives, start from the
trials it did not propose) is declared once, in `SAMPLERS`: the run config checks its
objectives against it, the run folder its space's genes (`run_folder.build_space`), and the
README's table is checked against it. A new sampler is one `register_sampler(...)` call.

Every sampler keeps its state in the study's storage (CMA-ES its optimizer in trial system
attributes; the others need nothing but the trials), so `resume` and extra workers continue the
same search.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

CMA_GENERATION = "cma:generation"  # the system attribute CmaEsSampler sets on its trials


def design_trials(trials: int) -> int:
    """How many finished trials `cmaes_warm` takes from its initial design: a third of the
    budget, at least 10 (Optuna's warm start needs ten to pick the best tenth from) and at most
    50 (past that, the design has done its job and CMA-ES's cheap steps are worth more)."""
    return min(max(10, trials // 3), 50)


@dataclass(frozen=True)
class Sampler:
    """A sampler a run config may name, and what it can do.

    `make(seed, trials)` builds it for a study of `trials` trials (`seed` None in processes
    that join a running study). `categorical`: it draws categorical genes as such (not at
    random beside its model); `objectives`: it searches several objectives (a Pareto front);
    `warm_start`: it learns from trials it did not propose, the queued baselines included."""

    name: str
    make: Callable[[int | None, int], BaseSampler]
    categorical: bool
    objectives: bool
    warm_start: bool
    summary: str = ""


SAMPLERS: dict[str, Sampler] = {}


def register_sampler(sampler: Sampler) -> Sampler:
    if sampler.name in SAMPLERS:
        raise ValueError(f"sampler {sampler.name!r} is registered twice")
    SAMPLERS[sampler.name] = sampler
    return sampler


def able(capability: str) -> list[str]:
    """The names of the samplers that can do `capability` (a field of `Sampler`), in order."""
    return [name for name, sampler in SAMPLERS.items() if getattr(sampler, capability)]


def make_sampler(name: str, *, seed: int | None, trials: int) -> BaseSampler:
    """The sampler called `name` (see `SAMPLERS`) for a study of `trials` trials.

    `seed` is None in processes that join a running study (workers, resume): equal seeds
    would make every process replay the same proposals."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}")
    return SAMPLERS[name].make(seed, trials)


def _gp(seed: int | None, trials: int = 0) -> BaseSampler:
    return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)


def _cmaes(seed: int | None, trials: int) -> BaseSampler:
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


def _cmaes_warm(seed: int | None, trials: int) -> BaseSampler:
    return WarmStartedCmaEs(design=_gp(seed), design_trials=design_trials(trials), seed=seed)


def _tpe(seed: int | None, trials: int) -> BaseSampler:
    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def _random(seed: int | None, trials: int) -> BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


# CMA-ES models floats only: it would draw a categorical gene at random, beside its
# distribution, and it optimises one objective.
for _sampler in (
    Sampler("gp", _gp, categorical=True, objectives=True, warm_start=True,
            summary="Gaussian-process Bayesian optimisation (the default)"),
    Sampler("tpe", _tpe, categorical=True, objectives=True, warm_start=True,
            summary="multivariate TPE"),
    Sampler("cmaes_warm", _cmaes_warm, categorical=False, objectives=False, warm_start=True,
            summary="a GP design, then CMA-ES started from its best"),
    Sampler("cmaes", _cmaes, categorical=False, objectives=False, warm_start=False,
            summary="CMA-ES from the centre of the box"),
    Sampler("random", _random, categorical=True, objectives=True, warm_start=False,
            summary="uniform draws"),
):  # fmt: skip
    register_sampler(_sampler)


class WarmStartedCmaEs(BaseSampler):
    """An initial design, then CMA-ES started from its best genomes.

    Until the study holds `design_trials` finished trials, every proposal comes from `design`
    (the queued baselines are the first of them). From then on CMA-ES proposes, built with
    Optuna's public warm start: `CmaEsSampler(source_trials=...)` with the finished trials that
    CMA-ES did not propose (the design), which sets the first mean, step and covariance from
    the best of them instead of the box centre.

    Resume and many workers: the CMA-ES state lives in storage exactly as for `cmaes` (the same
    `cma:` trial attributes), and a process that starts later rebuilds the same warm start
    from the same design trials; once CMA-ES's first generation is told, its stored optimizer
    is what every process continues from.
    """

    def __init__(self, *, design, design_trials: int, seed: int | None):
        self.design = design
        self.design_trials = design_trials
        self.seed = seed
        self.cmaes = None  # built when the design is complete: its trials are the warm start
        self._phase: dict[int, Any] = {}  # trial number -> the sampler proposing it

    def _sampler_for(self, study: optuna.Study, trial: FrozenTrial) -> BaseSampler:
        if trial.number not in self._phase:
            self._phase = {trial.number: self._choose(study)}  # one trial at a time per process
        return self._phase[trial.number]

    def _choose(self, study: optuna.Study) -> BaseSampler:
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(finished) < self.design_trials:
            return self.design
        if self.cmaes is None:
            source = [t for t in finished if CMA_GENERATION not in t.system_attrs]
            with warnings.catch_warnings():  # "source_trials is experimental": chosen knowingly
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.cmaes = optuna.samplers.CmaEsSampler(
                    seed=self.seed, source_trials=source, warn_independent_sampling=False
                )
        return self.cmaes

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return self._sampler_for(study, trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        return self._sampler_for(study, trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        return self._sampler_for(study, trial).sample_independent(
            study, trial, param_name, param_distribution
        )

    def before_trial(self, study, trial) -> None:
        self._sampler_for(study, trial).before_trial(study, trial)

    def after_trial(self, study, trial, state: TrialState, values) -> None:
        self._sampler_for(study, trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.design.reseed_rng()
        if self.cmaes is not None:
            self.cmaes.reseed_rng()
