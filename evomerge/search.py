"""The search: an Optuna study over merge recipes, scored on a live model.

One trial is `ask -> decode -> materialise -> score -> tell`, in `Search.objective`. All the
set-up (sources on the device, task vectors, ranks, random draws, lm-eval tasks, the evaluation
model) happens once in `Search.__init__`. The study lives in Optuna storage (SQLite in the run
folder by default), and so does the CMA-ES state, which is what makes `resume` and many
workers continue the same search.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from evomerge import __version__
from evomerge.candidate import CandidateError, LiveCandidate
from evomerge.config import RunConfig
from evomerge.errors import UserError
from evomerge.fitness.backends import sync_weights
from evomerge.heartbeat import TrialHeartbeat
from evomerge.recipe import Recipe
from evomerge.space import SearchSpace, load_space

if TYPE_CHECKING:
    import optuna

LOG = logging.getLogger(__name__)

RUN_FORMAT = 1  # bump when the run folder layout changes incompatibly


# --- studies and storage --------------------------------------------------------------------
def storage_url(config: RunConfig, run_dir: Path) -> str:
    return config.search.storage or f"sqlite:///{(run_dir / 'study.db').resolve()}"


def open_storage(url: str):
    """Optuna storage for a URL: a journal file or an RDB (SQLite, PostgreSQL, MySQL). A dead
    worker's trial is failed and retried by `evomerge.heartbeat`, for every storage alike."""
    import warnings

    import optuna
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        if url.startswith("journal:") or url.endswith(".log"):
            return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
        return RDBStorage(url)
    except (optuna.exceptions.StorageInternalError, ImportError, ValueError) as exc:
        raise UserError(f"cannot open study storage {url!r}: {exc}") from None
    except Exception as exc:  # SQLAlchemy's connection errors have many types
        if type(exc).__module__.startswith("sqlalchemy"):
            raise UserError(f"cannot reach study storage {url!r}: {type(exc).__name__}") from None
        raise


def open_config_storage(config: RunConfig, run_dir: Path):
    return open_storage(storage_url(config, run_dir))


def task_names(config: RunConfig) -> list[str]:
    return [t.name for t in config.fitness.tasks]


def load_or_create_study(config: RunConfig, storage, *, create: bool) -> "optuna.Study":
    import optuna

    from evomerge.samplers import make_sampler

    # Processes that join a study (workers, resume) must not replay the seeded draws of the
    # process that started it: equal seeds make equal proposals in every worker. A study run by
    # many workers is not reproducible anyway.
    seed = config.search.seed if create else None
    sampler = make_sampler(config.search.sampler, seed=seed, trials=config.search.trials)
    name = config.search.study_name
    if create:
        directions = ["maximize"] * len(task_names(config)) if config.search.sampler == "multi" else ["maximize"]
        study = optuna.create_study(
            storage=storage, study_name=name, sampler=sampler, directions=directions, load_if_exists=True
        )
        started = [t for t in study.get_trials(deepcopy=False) if "baseline" not in t.user_attrs or t.state.is_finished()]
        if started:  # another run's study: mixing its trials into a new run would corrupt both
            raise UserError(
                f"the storage already holds a study named {name!r} with {len(study.trials)} trials; "
                "continue it with `evomerge resume`/`evomerge worker`, or choose another search.study_name"
            )
        return study
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        raise UserError(f"no study named {name!r} in the storage") from None


def prepare_study(config: RunConfig, storage, space: SearchSpace) -> "optuna.Study":
    """Create the study (or open it if it exists); a new study gets the baselines queued."""
    study = load_or_create_study(config, storage, create=True)
    if config.search.baselines and not study.trials:
        for label, genome in space.baselines().items():
            study.enqueue_trial(genome, user_attrs={"baseline": label})
    return study


def worker_name() -> str:
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


# --- the search ----------------------------------------------------------------------------
class Search:
    """Everything one worker needs, built once; `run` does trials until the budget is met."""

    def __init__(self, config: RunConfig, run_dir: Path, *, storage=None, create: bool = True):
        import torch

        from evomerge.fitness import Evaluator

        self.config, self.run_dir = config, Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.space = build_space(config)
        self.storage = storage or open_config_storage(config, self.run_dir)
        if create:
            self.study = prepare_study(config, self.storage, self.space)
        else:
            self.study = load_or_create_study(config, self.storage, create=False)
        self.heartbeat = TrialHeartbeat(interval=config.search.heartbeat_seconds, grace=config.search.grace_seconds)
        self.worker = worker_name()
        self.running: Optional[int] = None  # the number of the trial this worker is on
        model, tokenizer = load_eval_model(config)
        template = self.space.decode({g.name: (g.low + g.high) / 2 for g in self.space.genes})
        self.candidate = LiveCandidate(model, template, seed=config.search.merge_seed, device=config.device)
        self.evaluator = Evaluator(model, tokenizer, config.fitness, self.run_dir)
        self.multi = config.search.sampler == "multi"

    # ask -> decode -> materialise -> score -> tell (tell is Optuna's, on return/raise)
    def objective(self, trial: "optuna.Trial"):
        self.running = trial.number
        trial.set_user_attr("worker", self.worker)
        with self.heartbeat.beating(trial):
            return self._objective(trial)

    def _objective(self, trial: "optuna.Trial"):
        genome = {g.name: trial.suggest_float(g.name, g.low, g.high) for g in self.space.genes}
        try:
            result = self._score(trial, self.space.decode(genome))
        except Exception as exc:  # recorded as a failed trial with its reason; the search goes on
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
            raise
        trial.set_user_attr("fitness", result.value)
        trial.set_user_attr("per_task", result.per_task)
        if self.multi:
            return [self._signed(name, value) for name, value in result.per_task.items()]
        return result.value

    def _score(self, trial: "optuna.Trial", recipe: Recipe):
        """Materialise and score: the subset first, the full set only when promising."""
        started = time.perf_counter()
        self.candidate.apply(recipe)
        sync_weights(self.evaluator.lm)  # vllm: push into the engine; hf: nothing to do
        trial.set_user_attr("merge_seconds", time.perf_counter() - started)
        result = self.evaluator.score(full=False)
        seconds = result.seconds
        trial.set_user_attr("subset_fitness", result.value)
        if not result.full and self._promising(result.value):
            result = self.evaluator.score(full=True)
            seconds += result.seconds
        trial.set_user_attr("fidelity", "full" if result.full else "subset")
        trial.set_user_attr("eval_seconds", seconds)  # subset + full passes together
        if not math.isfinite(result.value):
            raise CandidateError("the fitness is not a finite number")
        return result

    def _signed(self, task: str, value: float) -> float:
        return value if self.evaluator.tasks.maximize[task] else -value

    def _promising(self, subset_value: float) -> bool:
        """The promotion rule: full evaluation for the top quantile of subset scores so far."""
        rule = self.config.search.promotion
        if rule is None:
            return True
        scores = [t.user_attrs["subset_fitness"] for t in self.study.get_trials(deepcopy=False) if "subset_fitness" in t.user_attrs and t.state.is_finished()]
        if len(scores) < rule.warmup:
            return True
        scores.sort()
        cut = scores[min(len(scores) - 1, int(rule.quantile * len(scores)))]
        return subset_value >= cut

    def finished_trials(self) -> int:
        from optuna.trial import TrialState

        states = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
        return len(self.study.get_trials(deepcopy=False, states=states))

    def run(self, *, until: int, timeout_s: Optional[float] = None, progress: bool = True) -> None:
        """Run trials until the study holds `until` finished ones (counting every worker's), then
        stay until every peer's running trial has beaten since: a dead worker's trial is failed
        and retried here, not left RUNNING."""
        import optuna
        from optuna.study import MaxTrialsCallback
        from optuna.trial import TrialState

        # A worker that died left its trial RUNNING: fail (and retry) it now, even if the budget
        # is met; then after each trial.
        self.heartbeat.fail_stale_at_start(self.study)
        callbacks = [
            self.heartbeat.fail_stale,
            MaxTrialsCallback(until, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)),
        ]
        remaining = until - self.finished_trials()
        bar = _ProgressBar(remaining, self) if progress and remaining > 0 else None
        if bar:
            callbacks.append(bar)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        deadline = time.monotonic() + timeout_s if timeout_s else None
        try:
            while True:
                left = deadline - time.monotonic() if deadline else None
                if left is not None and left <= 0:
                    break
                remaining = until - self.finished_trials()
                if remaining > 0 or self._queued_retries():
                    self._optimize(max(remaining, 1), left, callbacks)
                elif not self._wait_for_silent_trials(deadline):
                    break
        finally:
            if bar:
                bar.close()

    def _wait_for_silent_trials(self, deadline: Optional[float]) -> bool:
        """With the budget met, wait while another worker's RUNNING trial has not beaten since:
        it beats, ends, or goes stale. True when a stale one was failed and its retry queued."""
        met, told = time.time(), False
        while silent := self.heartbeat.silent_since(self.study, met):
            if deadline and time.monotonic() >= deadline:
                return False
            if not told and time.time() - met > 2 * self.heartbeat.interval:
                told = True  # a live worker would have beaten by now
                LOG.warning(
                    "the budget is met; waiting for trial(s) %s of another worker, silent for %.0f s or more "
                    "(a dead worker's trial is failed after search.grace_seconds and run here)",
                    silent, time.time() - met,
                )
            time.sleep(self.heartbeat.interval)
            if self.heartbeat.fail_stale(self.study):
                return True
        return False

    def _optimize(self, n_trials: int, timeout: Optional[float], callbacks: list) -> None:
        try:
            self.study.optimize(
                self.objective,
                n_trials=n_trials,
                timeout=timeout,
                callbacks=callbacks,
                catch=(Exception,),
                gc_after_trial=False,
            )
        except ValueError:  # Optuna's "Cannot tell a FAIL trial"
            if not self._lost_running_trial():
                raise
            LOG.warning(
                "trial %d was failed by another worker while it ran here (its heartbeats came "
                "later than search.grace_seconds); its result is dropped and the search goes on",
                self.running,
            )

    def _queued_retries(self) -> bool:
        """Whether a failed trial's retry waits to be run (queued baselines do not count: a
        `--trials 0` search queues them and stops)."""
        from optuna.trial import TrialState

        waiting = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        return any("failed_trial" in t.system_attrs for t in waiting)

    def _lost_running_trial(self) -> bool:
        """Whether the trial this worker ran was finished by another worker: one that judged
        it dead because its heartbeats were late (a pause longer than the grace period)."""
        trial = next((t for t in self.study.get_trials(deepcopy=False) if t.number == self.running), None)
        return trial is not None and trial.state.is_finished()


def build_space(config: RunConfig) -> SearchSpace:
    from evomerge.checkpoint import Checkpoint

    space_config = load_space(config.space)
    base = Checkpoint(config.pool.base)
    return SearchSpace(
        space_config,
        base=config.pool.base,
        models=dict(config.pool.models),
        num_layers=base.num_layers,
        dtype=config.pool.dtype,
    )


def load_eval_model(config: RunConfig):
    """The live evaluation model (the base, to be overwritten) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.merge import torch_dtype

    dtype = torch_dtype(config.pool.dtype) or torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        config.pool.base, dtype=dtype, use_safetensors=True, trust_remote_code=False
    )
    model.to(config.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(config.pool.base, trust_remote_code=False)
    return model, tokenizer


class _ProgressBar:
    """tqdm bar: trials done, best so far, trials per minute, time left."""

    def __init__(self, total: int, search: Search):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="trial", desc="search", dynamic_ncols=True)
        self.started = time.perf_counter()
        self.search = search

    def __call__(self, study, trial) -> None:
        self.bar.update(1)
        rate = self.bar.n / max(time.perf_counter() - self.started, 1e-9) * 60
        best = best_trial(study)
        postfix = {"trials/min": f"{rate:.1f}"}
        if best is not None:
            postfix["best"] = f"{best.user_attrs.get('fitness', float('nan')):.4f}"
        self.bar.set_postfix(postfix)

    def close(self) -> None:
        self.bar.close()


# --- picking results -------------------------------------------------------------------------
def best_trial(study: "optuna.Study"):
    """The trial `export` takes by default.

    Single objective: the best full-fidelity trial (subset-only scores are noisier), else the
    best of any. Multi-objective: of the Pareto front, the trial with the best combined fitness.
    """
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "fitness" in t.user_attrs]
    if not done:
        return None
    if len(study.directions) > 1:
        front_ids = {t.number for t in study.best_trials}
        done = [t for t in done if t.number in front_ids] or done
    full = [t for t in done if t.user_attrs.get("fidelity") == "full"]
    return max(full or done, key=lambda t: t.user_attrs["fitness"])


def trial_recipe(space: SearchSpace, trial) -> Recipe:
    return space.decode({g.name: trial.params[g.name] for g in space.genes})


# --- run folders ---------------------------------------------------------------------------
def write_run_folder(config: RunConfig, run_dir: Path) -> None:
    """Snapshot the config and fingerprint the pool, so `resume` can check nothing moved."""
    import yaml

    from evomerge.fingerprint import pool_fingerprints

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    (run_dir / "pool.json").write_text(json.dumps(pool_fingerprints(config), indent=2))
    meta = {"evomerge_version": __version__, "run_format": RUN_FORMAT, "storage": storage_url(config, run_dir)}
    (run_dir / "run.json").write_text(json.dumps(meta, indent=2))


def read_run_folder(run_dir: Path, *, check_pool: bool = True) -> RunConfig:
    """The config of an existing run, after checking the folder and the pool."""
    from evomerge.config import load_run_config
    from evomerge.fingerprint import pool_fingerprints

    run_dir = Path(run_dir)
    meta_file = run_dir / "run.json"
    if not meta_file.exists():
        raise UserError(f"{str(run_dir)!r} is not an evomerge run folder (no run.json)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{meta_file} is corrupt") from None
    if meta.get("run_format") != RUN_FORMAT:
        raise UserError(
            f"{str(run_dir)!r} was written by evomerge {meta.get('evomerge_version', '?')} "
            f"(run format {meta.get('run_format')}); this evomerge {__version__} reads format {RUN_FORMAT}"
        )
    config = load_run_config(run_dir / "config.yaml")
    if check_pool:
        saved = json.loads((run_dir / "pool.json").read_text())
        now = pool_fingerprints(config)
        changed = [name for name in saved if saved[name] != now.get(name)]
        if changed:
            raise UserError(
                f"the model pool changed since this run started ({', '.join(changed)}); "
                "resuming would mix scores of different models — start a new run"
            )
    return config


def run_summary(study: "optuna.Study") -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    return {
        "trials": len(trials),
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "full_evaluations": sum(t.user_attrs.get("fidelity") == "full" for t in trials),
    }
