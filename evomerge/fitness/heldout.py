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
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.fitness.config import combine
from evomerge.fitness.uncertainty import paired_difference, standard_error

if TYPE_CHECKING:
    from evomerge.config import RunConfig
    from evomerge.fitness.evaluator import FitnessResult
    from evomerge.recipe import Recipe

SPLITS = ("dev", "test")


class HeldOut:
    """One live candidate model and a dev and a test evaluator over it."""

    def __init__(self, config: RunConfig, run_dir: Path) -> None:
        from evomerge.candidate import LiveCandidate
        from evomerge.fitness.evaluator import Evaluator
        from evomerge.search import build_space, load_eval_model

        model, tokenizer = load_eval_model(config)
        space = build_space(config)
        template = space.decode({g.name: (g.low + g.high) / 2 for g in space.genes})
        self.candidate = LiveCandidate(model, template, seed=config.search.merge_seed, device=config.device)
        work = Path(run_dir) / "heldout"
        self.evaluators = {
            split: Evaluator(model, tokenizer, config.fitness, work, split=split) for split in SPLITS
        }

    @property
    def held_out(self) -> dict[str, bool]:
        """Per task: whether it has a test split apart from its dev split."""
        return self.evaluators["test"].tasks.held_out

    def score(self, recipe: Recipe) -> dict[str, FitnessResult]:
        from evomerge.fitness.backends import sync_weights

        self.candidate.apply(recipe)
        out = {}
        for split, evaluator in self.evaluators.items():
            sync_weights(evaluator.lm)
            out[split] = evaluator.score(full=True, per_example=True)
        return out

    def describe(self, scores: dict[str, FitnessResult]) -> dict[str, Any]:
        """Per split: the combined value, per-task scores and their bootstrap standard errors."""
        return {
            split: {
                "value": result.value,
                "per_task": result.per_task,
                "se": {
                    task: standard_error(values, lambda v, t=task, e=self.evaluators[split]: e.aggregate(t, v))
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
            aggregates = {t: (lambda v, t=t: evaluator.aggregate(t, v)) for t in a[split].per_example}
            out[split] = paired_difference(
                a[split].per_example,
                b[split].per_example,
                aggregates,
                lambda per_task: combine(tasks.specs, per_task, tasks.maximize),
            )
        return out
