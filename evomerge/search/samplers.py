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
- `tpe`        multivariate TPE; `random`, uniform draws; `multi`, multivariate TPE over one
               objective per task (a Pareto front).

Categorical genes (a staged space's method per group, or order of merges): `gp`, `tpe` and
`random` draw them natively; `cmaes` and `cmaes_warm` are refused for such spaces
(`run_folder.build_space`), since CMA-ES would draw them at random, independently of its
distribution.

Every sampler keeps its state in the study's storage (CMA-ES its optimizer in trial system
attributes; the others need nothing but the trials), so `resume` and extra workers continue the
same search.
"""

from __future__ import annotations

import warnings
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


def make_sampler(name: str, *, seed: int | None, trials: int) -> BaseSampler:
    """The sampler called `name` (see `config.SamplerName`) for a study of `trials` trials.

    `seed` is None in processes that join a running study (workers, resume): equal seeds
    would make every process replay the same proposals."""
    if name == "gp":
        return _gp(seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "cmaes_warm":
        return WarmStartedCmaEs(design=_gp(seed), design_trials=design_trials(trials), seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}")


def _gp(seed: int | None) -> BaseSampler:
    return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)


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
