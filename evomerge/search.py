"""The search: an Optuna study over merge recipes, scored on a live model.

One trial is `ask -> decode -> materialise -> score -> tell`, in `Search.trial`; `Search.run`
repeats it until the budget is met. All the set-up (sources on the device, task vectors,
ranks, random draws, lm-eval tasks, the evaluation model) happens once in `Search.__init__`.
The study lives in Optuna storage (SQLite in the run folder by default, see `evomerge.study`),
and so does the CMA-ES state, which is what makes `resume` and many workers continue the same
search; `evomerge.workers` keeps the workers of one study in step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from evomerge.candidate import CandidateError, CompiledCandidate
from evomerge.config import RunConfig
from evomerge.fitness.backends import sync_weights
from evomerge.run_folder import build_space
from evomerge.samplers import make_sampler
from evomerge.study import best_trial, create_study, finished_count, open_run_storage, open_study
from evomerge.workers import Coordinator, retry_waiting, worker_name

if TYPE_CHECKING:
    import optuna

LOG = logging.getLogger(__name__)


# --- the search ----------------------------------------------------------------------------
class Search:
    """Everything one worker needs, built once; `run` does trials until the budget is met."""

    def __init__(self, config: RunConfig, run_dir: Path, *, create: bool = True):
        from evomerge.fitness import Evaluator

        self.config = config
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.space = build_space(config)
        storage = open_run_storage(config, run_dir)
        # Processes that join a study (workers, resume) must not replay the seeded draws of the
        # process that started it: equal seeds make equal proposals in every worker.
        seed = config.search.seed if create else None
        sampler = make_sampler(config.search.sampler, seed=seed, trials=config.search.trials)
        if create:
            self.study = create_study(config, storage, self.space, sampler=sampler)
        else:
            self.study = open_study(config, storage, sampler=sampler)
        self.workers = Coordinator(interval=config.search.heartbeat_seconds, grace=config.search.grace_seconds)
        self.worker = worker_name()
        model, tokenizer = load_eval_model(config)
        self.candidate = make_candidate(model, self.space, config)
        self.evaluator = Evaluator(model, tokenizer, config.fitness, run_dir)
        self.per_task = config.search.objectives == "per_task"

    def run(self, *, until: int, timeout_s: Optional[float] = None, progress: bool = True) -> None:
        """Run trials until the study holds `until` finished ones (counting every worker's), then
        stay until every peer's running trial has beaten since: a dead worker's trial is failed
        and retried here, not left RUNNING.

        The study is read once per trial; that one scan feeds the budget count, the stale-trial
        check, the progress bar and the next trial's promotion rule (on PostgreSQL each scan is
        a round trip that grows with the study)."""
        deadline = time.monotonic() + timeout_s if timeout_s else None
        # A worker that died left its trial RUNNING: fail (and retry) it now, even if the budget
        # is met; then after each trial.
        self.workers.fail_stale_at_start(self.study)
        trials = self.study.get_trials(deepcopy=False)
        remaining = until - finished_count(trials)
        bar = _ProgressBar(remaining) if progress and remaining > 0 else None
        try:
            while deadline is None or time.monotonic() < deadline:
                ran = finished_count(trials) < until or retry_waiting(trials)
                if ran:
                    self.trial(trials)
                elif not self.workers.wait_for_silent_trials(self.study, deadline):
                    break  # the budget is met and no peer's trial is left to wait for
                trials = self.study.get_trials(deepcopy=False)
                if self.workers.fail_stale(self.study, trials):  # a dead peer's trial, retry queued
                    trials = self.study.get_trials(deepcopy=False)
                if bar and ran:
                    bar.advance(best_trial(self.study, trials))
        finally:
            if bar:
                bar.close()

    def trial(self, trials: Sequence) -> None:
        """One trial: ask -> decode -> materialise -> score -> tell. A failing candidate is told
        failed, with its reason, and the search goes on. `trials` is the scan made just before."""
        trial = self.study.ask()
        try:
            with self.workers.beating(trial):
                trial.set_user_attr("worker", self.worker)
                genome = self.space.suggest(trial)
                started = time.perf_counter()
                self.candidate.apply(genome)
                sync_weights(self.evaluator.lm)  # vllm: push into the engine; hf: nothing to do
                trial.set_user_attr("merge_seconds", time.perf_counter() - started)
                values = self._score(trial, trials)
        except KeyboardInterrupt:  # Ctrl-C: no trial is left RUNNING
            self._tell_failed(trial, None)
            raise
        except Exception as exc:
            self._tell_failed(trial, exc)
            return
        try:
            self.study.tell(trial, values)
        except ValueError:  # Optuna's "Cannot tell a FAIL trial"
            self._lost(trial)

    def _score(self, trial: "optuna.Trial", trials: Sequence):
        """Score the subset, the full set only when promising; record the scores on `trial`
        and return what the study maximises."""
        result = self.evaluator.score(full=False)
        subset_value, seconds = result.value, result.seconds
        if not result.full and self._promising(subset_value, trials):
            result = self.evaluator.score(full=True)
            seconds += result.seconds
        trial.set_user_attr("subset_fitness", subset_value)
        trial.set_user_attr("fidelity", "full" if result.full else "subset")
        trial.set_user_attr("eval_seconds", seconds)  # subset + full passes together
        if not math.isfinite(result.value):
            raise CandidateError("the fitness is not a finite number")
        trial.set_user_attr("fitness", result.value)
        trial.set_user_attr("per_task", result.per_task)
        if self.per_task:
            return [self._signed(name, value) for name, value in result.per_task.items()]
        return result.value

    def _signed(self, task: str, value: float) -> float:
        return value if self.evaluator.tasks.maximize[task] else -value

    def _promising(self, subset_value: float, trials: Sequence) -> bool:
        """The promotion rule: full evaluation for the top quantile of subset scores so far."""
        rule = self.config.search.promotion
        if rule is None:
            return True
        scores = [t.user_attrs["subset_fitness"] for t in trials if "subset_fitness" in t.user_attrs and t.state.is_finished()]
        if len(scores) < rule.warmup:
            return True
        scores.sort()
        cut = scores[min(len(scores) - 1, int(rule.quantile * len(scores)))]
        return subset_value >= cut

    def _tell_failed(self, trial: "optuna.Trial", exc: Optional[Exception]) -> None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        reason = f"{type(exc).__name__}: {exc}" if exc else None
        try:
            if reason:
                trial.set_user_attr("fail_reason", reason)
            self.study.tell(trial, state=TrialState.FAIL)
        except (UpdateFinishedTrialError, ValueError):  # already failed by another worker
            self._lost(trial)
            return
        if reason:
            LOG.warning("trial %d failed: %s", trial.number, reason)

    def _lost(self, trial: "optuna.Trial") -> None:
        """The trial was failed by another worker, which judged this one dead because its
        heartbeats were late (a pause longer than the grace period)."""
        LOG.warning(
            "trial %d was failed by another worker while it ran here (its heartbeats came "
            "later than search.grace_seconds); its result is dropped and the search goes on",
            trial.number,
        )


def make_candidate(model, space, config: RunConfig):
    """What writes a genome into the live model: the compiled parameter-space candidate, the
    data-flow candidate (layers by reference) for a data-flow space, or a staged space's."""
    if space.kind == "staged":
        from evomerge.staged import staged_candidate

        return staged_candidate(model, space, seed=config.search.merge_seed, device=config.device)
    if space.kind == "dataflow":
        from evomerge.dataflow import DataflowCandidate
        from evomerge.merge import torch_dtype

        return DataflowCandidate(model, space, dtype=torch_dtype(config.pool.dtype) or model.dtype, device=config.device)
    return CompiledCandidate(model, space, seed=config.search.merge_seed, device=config.device)


def load_eval_model(config: RunConfig):
    """The live evaluation model (the base, to be overwritten) and its tokenizer."""
    import torch

    from evomerge.fitness.live_model import load_live_model
    from evomerge.merge import torch_dtype

    return load_live_model(config.pool.base, dtype=torch_dtype(config.pool.dtype) or torch.float32, device=config.device)


class _ProgressBar:
    """tqdm bar: trials done, best so far, trials per minute, time left."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="trial", desc="search", dynamic_ncols=True)
        self.started = time.perf_counter()

    def advance(self, best) -> None:
        self.bar.update(1)
        rate = self.bar.n / max(time.perf_counter() - self.started, 1e-9) * 60
        postfix = {"trials/min": f"{rate:.1f}"}
        if best is not None:
            postfix["best"] = f"{best.user_attrs.get('fitness', float('nan')):.4f}"
        self.bar.set_postfix(postfix)

    def close(self) -> None:
        self.bar.close()
