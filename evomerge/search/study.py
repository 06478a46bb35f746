"""The study of a run: its Optuna storage, opening or creating it, and picking results.

Light on purpose: `evomerge report` and `evomerge export` read a study through this module
without loading torch or the search. The sampler is the caller's (the search makes it): a
process that only reads the study needs none.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import UserError
from evomerge.search.config import RunConfig

if TYPE_CHECKING:
    import optuna

    from evomerge.spaces.base import Space


# --- storage ----------------------------------------------------------------------------------
def storage_url(config: RunConfig, run_dir: Path) -> str:
    return config.search.storage or f"sqlite:///{(Path(run_dir) / 'study.db').resolve()}"


def masked(url: str) -> str:
    """`url` with its password, if any, replaced by `***`: what messages and logs may show."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


def _without_password(text: str, url: str) -> str:
    password = re.search(r"//[^/@:]*:([^/@]*)@", url)
    return text.replace(password.group(1), "***") if password and password.group(1) else text


def open_storage(url: str):
    """Optuna storage for a URL: a journal file or an RDB (SQLite, PostgreSQL, MySQL). A dead
    worker's trial is failed and retried by `evomerge.search.workers`, for every storage alike."""
    import optuna
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    try:
        if url.startswith("journal:") or url.endswith(".log"):
            return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
        return RDBStorage(url)
    except (optuna.exceptions.StorageInternalError, ImportError, ValueError) as exc:
        reason = _without_password(str(exc), url)
        raise UserError(f"cannot open study storage {masked(url)!r}: {reason}") from None
    except OSError as exc:  # a journal file in a missing, read-only or file-blocked folder
        raise UserError(
            f"cannot open study storage {masked(url)!r} ({exc.strerror or exc}); its folder "
            "must exist and be writable"
        ) from None
    except Exception as exc:  # SQLAlchemy's connection errors have many types
        if type(exc).__module__.startswith("sqlalchemy"):
            raise UserError(
                f"cannot reach study storage {masked(url)!r}: {type(exc).__name__}"
            ) from None
        raise


def open_run_storage(config: RunConfig, run_dir: Path):
    return open_storage(storage_url(config, run_dir))


# --- the study --------------------------------------------------------------------------------
def objective_names(config: RunConfig) -> list[str]:
    """What the study maximises: one combined fitness, or each task's score (`per_task`)."""
    if config.search.objectives == "per_task":
        return [t.name for t in config.fitness.tasks]
    return ["fitness"]


def create_study(config: RunConfig, storage, space: Space, *, sampler=None) -> optuna.Study:
    """Create the run's study (or open the one a `--trials 0` set-up made), with the
    baselines queued when it is new. A study another run already started is refused."""
    import optuna

    name = config.search.study_name
    directions = ["maximize"] * len(objective_names(config))
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        sampler=sampler,
        directions=directions,
        load_if_exists=True,
    )
    trials = study.get_trials(deepcopy=False)
    started = [t for t in trials if "baseline" not in t.user_attrs or t.state.is_finished()]
    if started:  # another run's study: mixing its trials into a new run would corrupt both
        raise UserError(
            f"the storage already holds a study named {name!r} with {len(trials)} trials; "
            "continue it with `evomerge resume`/`evomerge worker`, "
            "or choose another search.study_name"
        )
    if config.search.baselines and not trials:
        for label, genome in space.baselines().items():
            study.enqueue_trial(genome, user_attrs={"baseline": label})
    return study


def open_study(config: RunConfig, storage, *, sampler=None) -> optuna.Study:
    import optuna

    name = config.search.study_name
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        raise UserError(f"no study named {name!r} in the storage") from None


def open_run_study(config: RunConfig, run_dir: Path) -> optuna.Study:
    """The study of a run folder, for reading (no sampler)."""
    return open_study(config, open_run_storage(config, run_dir))


# --- reading trials ---------------------------------------------------------------------------
def finished_count(trials: Sequence) -> int:
    """Trials that count against the budget: complete, failed or pruned, by any worker."""
    return sum(t.state.is_finished() for t in trials)


def best_trial(study: optuna.Study, trials: Sequence | None = None):
    """The trial `export` takes by default, from `trials` (a scan of the study) if given.

    Single objective: the best full-fidelity trial (subset-only scores are noisier), else the
    best of any. Several objectives: of the Pareto front, the trial with the best combined
    fitness.
    """
    from optuna.trial import TrialState

    if trials is None:
        trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    done = [t for t in complete if "fitness" in t.user_attrs]
    if not done:
        return None
    if len(study.directions) > 1:
        front = {t.number for t in pareto_front(complete, study.directions)}
        done = [t for t in done if t.number in front] or done
    full = [t for t in done if t.user_attrs.get("fidelity") == "full"]
    return max(full or done, key=lambda t: t.user_attrs["fitness"])


def pareto_front(trials: Sequence, directions: Sequence) -> list:
    """The trials no other trial dominates (no worse in every objective, better in one): what
    Optuna's `study.best_trials` gives, computed from a scan already made."""
    import numpy as np
    from optuna.study import StudyDirection

    if not trials:
        return []
    signs = np.array([1.0 if d == StudyDirection.MAXIMIZE else -1.0 for d in directions])
    values = np.array([t.values for t in trials], dtype=float) * signs
    return [
        trial
        for trial, own in zip(trials, values)
        if not np.any(np.all(values >= own, axis=1) & np.any(values > own, axis=1))
    ]


def run_summary(trials: Sequence) -> dict[str, Any]:
    from optuna.trial import TrialState

    return {
        "trials": len(trials),
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "full_evaluations": sum(t.user_attrs.get("fidelity") == "full" for t in trials),
    }
