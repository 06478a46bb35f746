"""Scores after the search: chosen trials on every dev example and on the held-out test split.

The search scores candidates on the dev split (and on a subset of it, mostly); which trial is
best is decided there. Only then are the chosen trials (the best, and the best baseline to
compare it with) scored again, on all of dev and on test, keeping each example's value for
standard errors (`fitness.uncertainty`). Nothing here writes to the study: the search never
sees a test score.

    held = HeldOut(config, run_dir)                      # the live model and both evaluators
    scores = held.score(recipe)                          # {"dev": FitnessResult, "test": ...}
    row = held.describe(scores)                          # values, per-task scores and errors
    gain = held.compare(scores_best, scores_baseline)    # paired, per split

`chosen_scores(config, run_dir, study, trial)` does all that for `evomerge report` and `export`:
the trial against the best baseline, cached under RUN_DIR/heldout/ (one file per pair). It is
the only part of either command that loads the model (the base as a live model, and every pool
member once to prepare the candidate); its `say` hook announces that before it happens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.fitness.config import combine
from evomerge.fitness.uncertainty import paired_difference, standard_error
from evomerge.io.checkpoint import reference_parts
from evomerge.io.output import write_text_atomic

if TYPE_CHECKING:
    import optuna

    from evomerge.fitness.evaluator import FitnessResult
    from evomerge.search.config import RunConfig

SPLITS = ("dev", "test")


class HeldOut:
    """One live candidate model and a dev and a test evaluator over it."""

    def __init__(self, config: RunConfig, run_dir: Path) -> None:
        from evomerge.fitness.evaluator import Evaluator
        from evomerge.search.loop import load_eval_model, make_candidate
        from evomerge.search.run_folder import build_space

        model, tokenizer = load_eval_model(config)
        self.space = build_space(config, run_dir)
        self.candidate = make_candidate(model, self.space, config)
        work = Path(run_dir) / "heldout"
        self.evaluators = {
            split: Evaluator(model, tokenizer, config.fitness, work, split=split)
            for split in SPLITS
        }

    @property
    def held_out(self) -> dict[str, bool]:
        """Per task: whether it has a test split apart from its dev split."""
        return self.evaluators["test"].tasks.held_out

    def score(
        self, genome: dict[str, float], user_attrs: dict | None = None
    ) -> dict[str, FitnessResult]:
        """`genome` (a trial's params; with its `user_attrs`, a refined trial's per-tensor
        weights) materialised, then scored on every example of dev and of test."""
        from evomerge.search.refine import apply_trial

        genome = {g.name: genome[g.name] for g in self.space.genes}
        apply_trial(self.candidate, genome, user_attrs or {})
        out = {}
        for split, evaluator in self.evaluators.items():
            evaluator.sync_weights()
            out[split] = evaluator.score(full=True, per_example=True)
        return out

    def describe(self, scores: dict[str, FitnessResult]) -> dict[str, Any]:
        """Per split: the combined value, per-task scores and their bootstrap standard errors."""
        return {
            split: {
                "value": _finite(result.value),
                "per_task": {task: _finite(v) for task, v in result.per_task.items()},
                "se": {
                    task: _finite(
                        standard_error(
                            values, lambda v, t=task, e=self.evaluators[split]: e.aggregate(t, v)
                        )
                    )
                    for task, values in result.per_example.items()
                },
                "n_examples": result.n_examples,
            }
            for split, result in scores.items()
        }

    def compare(self, a: dict[str, FitnessResult], b: dict[str, FitnessResult]) -> dict[str, Any]:
        """Per split: a's combined fitness minus b's over the same examples, with its standard
        error (None where a task has no per-example values to resample)."""
        out = {}
        for split, evaluator in self.evaluators.items():
            tasks = evaluator.tasks
            if set(a[split].per_example) != {s.name for s in tasks.specs}:
                out[split] = None
                continue
            aggregates = {
                t: (lambda v, t=t, e=evaluator: e.aggregate(t, v)) for t in a[split].per_example
            }
            paired = paired_difference(
                a[split].per_example,
                b[split].per_example,
                aggregates,
                lambda per_task, tasks=tasks: combine(tasks.specs, per_task, tasks.maximize),
            )
            out[split] = {k: _finite(v) for k, v in paired.items()}
        return out


def _finite(value: float) -> float | None:
    """None for NaN or infinity (a collapsed merge's perplexity): JSON has no such numbers."""
    return float(value) if math.isfinite(value) else None


def best_baseline(study: optuna.Study, *, other_than: int) -> optuna.trial.FrozenTrial | None:
    """The completed baseline with the best search fitness, other than trial `other_than`: the
    rival a search must beat (when the best trial is a baseline, the next best one)."""
    from optuna.trial import TrialState

    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "baseline" in t.user_attrs and "fitness" in t.user_attrs and t.number != other_than
    ]
    return max(done, key=lambda t: t.user_attrs["fitness"], default=None)


def refined_start(study: optuna.Study, trial) -> optuna.trial.FrozenTrial | None:
    """The black-box trial a refined `trial` started from (None for any other trial)."""
    from evomerge.spaces.refine import REFINED_ATTR

    stats = trial.user_attrs.get("refine") or {}
    if REFINED_ATTR not in trial.user_attrs or "from_trial" not in stats:
        return None
    found = [t for t in study.get_trials(deepcopy=False) if t.number == stats["from_trial"]]
    return found[0] if found else None


def chosen_scores(
    config: RunConfig,
    run_dir: Path,
    study: optuna.Study,
    trial,
    *,
    say: Callable[[str], Any] = lambda text: None,
) -> dict[str, Any]:
    """`trial` and the best baseline (and, for a refined trial, the black-box trial it was
    refined from) scored on all of dev and on test, with standard errors and the paired
    differences; cached in RUN_DIR/heldout/. Without the pool on disk, a dict with one key,
    `unavailable`, says why. `say` gets one line just before the model is loaded (never when
    the scores come from the cache or the pool is gone)."""
    rival = best_baseline(study, other_than=trial.number)
    start = refined_start(study, trial)
    chosen = [t for t in (trial, start, rival) if t is not None]
    chosen = list({t.number: t for t in chosen}.values())  # a start that is the best baseline
    key = {
        "trials": {str(t.number): t.params for t in chosen},
        "fitness": config.fitness.model_dump(mode="json"),
    }
    path = Path(run_dir) / "heldout" / f"scores-{'-'.join(str(t.number) for t in chosen)}.json"
    cached = _read_cache(path)
    if cached is not None and cached.get("key") == key:
        return cached["scores"]
    folders = [
        part
        for ref in (config.pool.base, *config.pool.models.values())
        for part in reference_parts(ref)
    ]
    missing = [p for p in folders if not Path(p).exists()]
    if missing:
        return {"unavailable": f"the pool is not on disk any more ({missing[0]})"}

    numbers = " and ".join(f"#{t.number}" for t in chosen)
    say(f"held-out scores: loading the model to score {numbers} on all of dev and on test")
    held = HeldOut(config, Path(run_dir))
    scores = {t.number: held.score(t.params, t.user_attrs) for t in chosen}
    out = {
        "held_out": held.held_out,
        "trials": [
            {
                "number": t.number,
                "baseline": t.user_attrs.get("baseline"),
                "refined_from": start.number if t is trial and start is not None else None,
                **held.describe(scores[t.number]),
            }
            for t in chosen
        ],
        "paired": held.compare(scores[trial.number], scores[rival.number]) if rival else None,
        # a refined trial against the black-box trial it was refined from
        "paired_start": (
            held.compare(scores[trial.number], scores[start.number]) if start else None
        ),
    }
    write_text_atomic(path, json.dumps({"key": key, "scores": out}, indent=1))
    return out


def _read_cache(path: Path) -> dict | None:
    """A cached entry, or None when there is none or it cannot be read (a cache written by an
    older evomerge in place and cut short by a kill): it is then scored again and rewritten."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # missing, unreadable, cut short, not JSON
        return None
    ok = isinstance(cached, dict) and isinstance(cached.get("scores"), dict)
    return cached if ok else None
