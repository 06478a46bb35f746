"""The search: an Optuna study over merge recipes, scored on a live model.

One trial is `ask -> decode -> materialise -> score -> tell`, in `Search.trial`; `Search.run`
repeats it until the budget is met. All the set-up (sources on the device, task vectors,
ranks, random draws, lm-eval tasks, the evaluation model) happens once in `Search.__init__`.
The study lives in Optuna storage (SQLite in the run folder by default, see
`evomerge.search.study`), and so does the CMA-ES state, which is what makes `resume` and many
workers continue the same search; `evomerge.search.workers` keeps the workers of one study in step.
"""

from __future__ import annotations

import errno
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from evomerge.errors import UserError
from evomerge.search.config import RunConfig
from evomerge.search.fidelity import RUNGS_ATTR, Schedule, write_examples
from evomerge.search.refine import apply_trial, make_refiner
from evomerge.search.run_folder import build_space
from evomerge.search.samplers import make_sampler
from evomerge.search.study import (
    best_trial,
    create_study,
    finished_count,
    open_run_storage,
    open_study,
)
from evomerge.search.workers import Coordinator, retry_waiting, worker_name
from evomerge.spaces.refine import REFINED_ATTR

if TYPE_CHECKING:
    import optuna

    from evomerge.spaces.base import Candidate, Space

LOG = logging.getLogger(__name__)


# --- the search ----------------------------------------------------------------------------
class Search:
    """Everything one worker needs, built once; `run` does trials until the budget is met."""

    def __init__(self, config: RunConfig, run_dir: Path, *, create: bool = True):
        from evomerge.fitness import Evaluator

        self.config = config
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.space = build_space(config, run_dir)
        storage = open_run_storage(config, run_dir)
        # Processes that join a study (workers, resume) must not replay the seeded draws of the
        # process that started it: equal seeds make equal proposals in every worker.
        seed = config.search.seed if create else None
        sampler = make_sampler(config.search.sampler, seed=seed, trials=config.search.trials)
        if create:
            self.study = create_study(config, storage, self.space, sampler=sampler)
        else:
            self.study = open_study(config, storage, sampler=sampler)
        self.workers = Coordinator(
            interval=config.search.heartbeat_seconds, grace=config.search.grace_seconds
        )
        self.worker = worker_name()
        model, tokenizer = load_eval_model(config)
        self.evaluator = Evaluator(model, tokenizer, config.fitness, run_dir)
        started = time.perf_counter()
        if getattr(self.space, "statistics", None) is not None:  # RegMean: once a run
            collect_statistics(config, run_dir, self.evaluator)
        self.statistics_seconds = time.perf_counter() - started
        self.candidate = make_candidate(model, self.space, config)
        self.schedule = Schedule.of(config, self.evaluator.tasks)
        self.refiner = make_refiner(config, self.candidate, self.evaluator, self.space)
        self.run_dir = run_dir
        self.per_task = config.search.objectives == "per_task"
        self._zeros_checked = False

    def run(
        self, *, until: int, timeout_s: float | None = None, progress: bool | TextIO = True
    ) -> None:
        """Run trials until the study holds `until` finished ones (counting every worker's), then
        stay until every peer's running trial has beaten since: a dead worker's trial is failed
        and retried here, not left RUNNING.

        The study is read once per trial; that one scan feeds the budget count, the stale-trial
        check, the progress bar and the next trial's fidelity rule (on PostgreSQL each scan is
        a round trip that grows with the study). `progress`: show a progress bar and a line per
        new best, on stderr or on the stream given."""
        deadline = time.monotonic() + timeout_s if timeout_s else None
        # A worker that died left its trial RUNNING: fail (and retry) it now, even if the budget
        # is met; then after each trial.
        self.workers.fail_stale_at_start(self.study)
        trials = self.study.get_trials(deepcopy=False)
        remaining = until - finished_count(trials)
        stream = sys.stderr if isinstance(progress, bool) else progress
        bar = (
            _ProgressBar(remaining, stream, best_trial(self.study, trials))
            if progress and remaining > 0
            else None
        )
        try:
            while deadline is None or time.monotonic() < deadline:
                ran = finished_count(trials) < until or retry_waiting(trials)
                if not ran and self.refiner is not None:  # the budget is met: refine once
                    ran = self.refiner.queue(self.study, trials)
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
        trial = None
        try:
            with _interrupts_held():  # a Ctrl-C inside `ask` would leave its trial RUNNING
                trial = self.study.ask()
            with self.workers.beating(trial):
                trial.set_user_attr("worker", self.worker)
                genome = self.space.suggest(trial)
                started = time.perf_counter()
                apply_trial(self.candidate, genome, trial.user_attrs)  # refined: per tensor
                self.evaluator.sync_weights()  # vllm: push into the engine; hf: nothing to do
                trial.set_user_attr("merge_seconds", time.perf_counter() - started)
                values = self._score(trial, trials)
        except KeyboardInterrupt:  # Ctrl-C: no trial is left RUNNING
            if trial is not None:
                with _interrupts_held():  # (a second Ctrl-C must not stop the telling)
                    self._tell_failed(trial, None)
            raise
        except Exception as exc:
            if _disk_full(exc):  # every later trial would fail too: stop, in one sentence
                self._stop_on_full_disk(trial, exc)
            self._tell_failed(trial, exc)
            return
        with _interrupts_held():
            try:
                self.study.tell(trial, values)
            except ValueError:  # Optuna's "Cannot tell a FAIL trial"
                self._lost(trial)
            except Exception as exc:
                if _disk_full(exc):  # the study's own storage is on the full disk
                    self._stop_on_full_disk(trial, exc)
                raise
        self._warn_if_baselines_zero()

    def _warn_if_baselines_zero(self) -> None:
        """Once every queued baseline is scored: one line for each task on which all of them
        (the models themselves among them) scored exactly 0, with the likely causes."""
        if self._zeros_checked:
            return
        from optuna.trial import TrialState

        from evomerge.fitness.zeros import all_zero_tasks, zero_warning

        baselines = [t for t in self.study.get_trials(deepcopy=False) if "baseline" in t.user_attrs]
        if any(not t.state.is_finished() for t in baselines):
            return  # (baselines are queued when the study is made: none now means none ever)
        self._zeros_checked = True
        rows = [t.user_attrs.get("per_task") or {} for t in baselines]
        done = [r for t, r in zip(baselines, rows) if t.state == TrialState.COMPLETE]
        zeros = all_zero_tasks(done, self.evaluator.tasks.maximize)
        if zeros:
            LOG.warning(zero_warning(zeros, who="every baseline (the models, their merges) scored"))

    def _score(self, trial: optuna.Trial, trials: Sequence):
        """Score rung by rung (`evomerge.search.fidelity`), keep the per-example scores in the run
        folder, record the scores on `trial` and return what the study maximises."""
        started = time.perf_counter()
        baseline = "baseline" in trial.user_attrs or REFINED_ATTR in trial.user_attrs
        incumbent = best_trial(self.study, trials)
        if incumbent is not None and len(incumbent.user_attrs.get(RUNGS_ATTR) or ()) < len(
            self.schedule.sizes
        ):
            incumbent = None  # not scored on every rung: nothing to compare with
        scored = self.schedule.score(
            self.evaluator, peers=trials, incumbent=incumbent, to_the_end=baseline
        )
        write_examples(self.run_dir, trial.number, scored)
        trial.set_user_attr(RUNGS_ATTR, scored.rungs)
        trial.set_user_attr("fidelity", "full" if scored.full else "subset")
        trial.set_user_attr("examples", scored.examples)
        trial.set_user_attr("eval_seconds", time.perf_counter() - started)  # every rung together
        trial.set_user_attr("fitness", scored.value)
        trial.set_user_attr("per_task", scored.per_task)
        if self.per_task:
            return [
                self._signed(s.name, scored.per_task[s.name]) for s in self.evaluator.tasks.specs
            ]
        return scored.value

    def _signed(self, task: str, value: float) -> float:
        return value if self.evaluator.tasks.maximize[task] else -value

    def _tell_failed(self, trial: optuna.Trial, exc: Exception | None) -> None:
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

    def _stop_on_full_disk(self, trial: optuna.Trial | None, exc: Exception) -> None:
        """Fail the trial with its reason, if the storage still takes that, and stop the search
        with one sentence (`UserError`). If the storage cannot take it either, the trial stays
        RUNNING and `resume` retries it: nothing is lost."""
        from optuna.trial import TrialState

        told = ""
        if trial is not None:
            try:  # as _tell_failed does, without its log line: the sentence below says it all
                trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {_first_line(exc)}")
                self.study.tell(trial, state=TrialState.FAIL)
                told = f"trial {trial.number} was marked failed; "
            except Exception:  # the storage is on the full disk too
                told = f"trial {trial.number} is retried on resume; "
        raise UserError(
            f"the disk is full ({_first_line(exc)}); {told}free some space, then continue "
            f"with `evomerge resume {self.run_dir}`"
        ) from None

    def _lost(self, trial: optuna.Trial) -> None:
        """The trial was failed by another worker, which judged this one dead because its
        heartbeats were late (a pause longer than the grace period)."""
        LOG.warning(
            "trial %d was failed by another worker while it ran here (its heartbeats came "
            "later than search.grace_seconds); its result is dropped and the search goes on",
            trial.number,
        )


_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or an error it was raised from, is a full disk or quota: an OSError
    itself, or as a database reports it (SQLite: "database or disk is full")."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return True
        if "disk is full" in str(exc) or "No space left on device" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then raise it (KeyboardInterrupt).

    The storage calls that create or finish a trial must not be cut in two: a trial created
    and never told stays RUNNING in the study. Outside the main thread (where signal handlers
    cannot be set), or where SIGINT is not Python's KeyboardInterrupt, nothing is held."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    held: list = []
    signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


def make_candidate(model, space: Space, config: RunConfig) -> Candidate:
    """What writes a genome into the live model: the candidate of the space's kind
    (`evomerge.spaces.registry`), set up once for the run."""
    from evomerge.spaces.registry import PARAMETERS, get_kind

    options = {}
    if space.kind == PARAMETERS:  # its inputs on the device or streamed from the host
        from evomerge.search.memory_plan import resolve_tier

        options["tier"] = resolve_tier(config)
    return get_kind(space.kind).candidate(
        model,
        space,
        seed=config.search.merge_seed,
        device=config.device,
        dtype=config.pool.dtype,
        **options,
    )


def collect_statistics(config: RunConfig, run_dir: Path, evaluator) -> None:
    """Write each pool model's input statistics into the run folder, unless a start before
    this one did (`evomerge.fitness.statistics`)."""
    from evomerge.fitness.statistics import write_statistics
    from evomerge.fitness.teacher import teacher_forced_examples
    from evomerge.search.run_folder import output_plan, statistics_files

    files = statistics_files(config, run_dir)
    if all(path.is_file() for path in files.values()):
        return
    needed_by = ("a regmean space's input statistics", "search another space for this task")
    write_statistics(
        evaluator.model,
        teacher_forced_examples(evaluator, needed_by),
        dict(config.pool.models),
        next(iter(files.values())).parent,
        restore=config.pool.base,
        plan=output_plan(config) if config.pool.vocabulary() else None,
    )


def load_eval_model(config: RunConfig):
    """The live evaluation model (the base, to be overwritten) and its tokenizer. Where the
    pool's vocabularies are aligned (`pool.tokenizer_source`) or the search sets a chat
    template (`pool.chat_template`), the model has the output vocabulary's rows and stop tokens
    and the tokenizer is the merged one (with its chat template), both as `evomerge merge`
    writes them (`write_output_vocabulary`)."""
    import tempfile

    import torch

    from evomerge.fitness.live_model import load_live_model
    from evomerge.io.dtypes import torch_dtype

    dtype = torch_dtype(config.pool.dtype) or torch.float32
    if not config.pool.vocabulary() and config.pool.chat_template is None:
        return load_live_model(config.pool.base, dtype=dtype, device=config.device)
    with tempfile.TemporaryDirectory(prefix="evomerge-vocabulary-") as folder:
        write_output_vocabulary(config, Path(folder))
        return load_live_model(
            config.pool.base, dtype=dtype, device=config.device, vocabulary=Path(folder)
        )


def write_output_vocabulary(config: RunConfig, folder: Path) -> None:
    """config.json, generation_config.json and the tokenizer files of every merge of the
    search, written into `folder` as `evomerge merge` writes them (the output vocabulary does
    not depend on the genome: any genome's recipe gives it; its first stage reads the pool)."""
    from evomerge.io.output import write_config
    from evomerge.merging.executor import write_tokenizer
    from evomerge.search.run_folder import output_plan

    plan = output_plan(config)
    source = plan.checkpoints[plan.config_source].path
    write_config(source, folder, layer_sources=plan.layer_sources(), dtype=config.pool.dtype)
    write_tokenizer(plan, folder)


class _ProgressBar:
    """tqdm bar on `stream`: trials done, best so far, trials per minute, time left; and a
    line above it whenever a new best full-fidelity trial appears."""

    def __init__(self, total: int, stream: TextIO, best=None):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="trial", desc="search", dynamic_ncols=True, file=stream)
        self.started = time.perf_counter()
        self.stream = stream
        self.best = best.number if best is not None else None

    def advance(self, best) -> None:
        self.bar.update(1)
        rate = self.bar.n / max(time.perf_counter() - self.started, 1e-9) * 60
        postfix = {"trials/min": f"{rate:.1f}"}
        if best is not None:
            fitness = best.user_attrs.get("fitness", float("nan"))
            postfix["best"] = f"{fitness:.4f}"
            if best.number != self.best:
                self.best = best.number
                self.bar.write(
                    f"new best: trial #{best.number}, fitness {fitness:.4f}", file=self.stream
                )
        self.bar.set_postfix(postfix)

    def close(self) -> None:
        self.bar.close()
