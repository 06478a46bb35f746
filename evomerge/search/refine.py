"""Learned merging inside the study: the best trial's weights refined per tensor by gradient.

After the black-box budget, the best trial's genome is the start; every output tensor gets one
free weight per model (`evomerge.spaces.refine.DifferentiableMerge`, masks fixed by the trial's
densities and merge seed), trained with the model's own weights frozen on the dev documents'
teacher-forced answer log-likelihood (`evomerge.fitness.teacher`):

    min_w  mean_{x in train fold} NLL(answer_x | context_x; theta(w)) + l2 * ||w - w_start||^2

with Adam, the weights kept inside the space's weight bounds. A fold of dev (`held_out`) is
kept apart: every `eval_every` steps its greedy-match score (the `acc`/`exact_match` of these
tasks, from the same teacher-forced pass) picks the best weights so far, and `patience` checks
without a better one stop the run. With `objective: entropy` no answer is read (AdaMerging's
unsupervised objective, for tasks without targets): the loss is the mean entropy H of the
next-token distribution at the last context position of each document, where its answer starts,

    min_w  mean_{x in train fold} H(p(. | context_x; theta(w))) + l2 * ||w - w_start||^2

and the held-out fold's mean entropy (lower is better) picks the weights and stops the run.

The result is a trial of the same study: enqueued with the start genome as its params and the
weights as a user attribute (`REFINED_ATTR`), then asked, materialised through the candidate's
own executor (`apply_refined`), scored on every dev example and told like any trial, by whichever
worker asks it. A run interrupted during the refinement stored nothing of it and refines again on
resume; one interrupted after the enqueue finds the refined trial waiting and scores it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from evomerge.fitness.teacher import (
    TeacherBatch,
    batches,
    fold_scores,
    make_batch,
    prompt_examples,
    split_examples,
    teacher_forced_examples,
)
from evomerge.search.study import best_trial
from evomerge.spaces.refine import REFINED_ATTR
from evomerge.spaces.refine.merge import DifferentiableMerge
from evomerge.spaces.refine.recipe import apply_refined

if TYPE_CHECKING:
    import optuna

    from evomerge.search.refine_config import RefineConfig

LOG = logging.getLogger(__name__)

STATS_ATTR = "refine"
"""A refined trial's user attribute: where it started and what the refinement cost."""


@dataclass
class Refinement:
    """Refined weights (output tensor -> per-model weights) and what finding them cost."""

    weights: dict[str, list[float]]
    stats: dict[str, Any]


def apply_trial(candidate, genome: dict, user_attrs: dict) -> None:
    """Materialise a trial: its refined weights where it has them, else its genome."""
    if REFINED_ATTR in user_attrs:
        apply_refined(candidate, genome, user_attrs[REFINED_ATTR])
    else:
        candidate.apply(genome)


class Refiner:
    """The refinement of one run: the dev folds built once, the candidate and live model shared
    with the search."""

    def __init__(self, config: RefineConfig, candidate, evaluator, space, *, seed: int):
        self.config, self.candidate, self.evaluator = config, candidate, evaluator
        self.model = evaluator.model
        self.seed = seed
        self.entropy = config.objective == "entropy"
        examples = (
            prompt_examples(evaluator) if self.entropy else teacher_forced_examples(evaluator)
        )
        train, held = split_examples(examples, held_out=config.held_out, seed=seed)
        self.train, self.held = train, batches(held, config.batch)
        self.bounds = _weight_bounds(space)

    # --- the study -----------------------------------------------------------------------
    def queue(self, study: optuna.Study, trials: Sequence) -> bool:
        """Once the budget is met: refine the best trial and enqueue the result, once per
        study. Whether a refined trial now waits to be asked."""
        from optuna.trial import TrialState

        refined = [t for t in trials if REFINED_ATTR in t.user_attrs]
        if any(t.state == TrialState.WAITING for t in refined):
            return True
        start = best_trial(study, trials)
        if refined or start is None:
            return False
        if any(t.state == TrialState.WAITING for t in trials):
            # Baselines queued beyond the budget: the study asks the oldest waiting trial first,
            # so a refined trial queued now would run them all first.
            LOG.warning("no refinement: the budget is smaller than the queued baselines")
            return False
        LOG.info("refining trial #%d by gradient", start.number)
        result = self.refine(start.params)
        result.stats["from_trial"] = start.number
        study.enqueue_trial(
            dict(start.params),
            user_attrs={REFINED_ATTR: result.weights, STATS_ATTR: result.stats},
        )
        return True

    # --- the refinement ------------------------------------------------------------------
    def refine(self, genome: dict[str, float]) -> Refinement:
        """The genome's weights refined per tensor (the best on the held-out fold)."""
        cfg, started = self.config, time.perf_counter()
        merge = DifferentiableMerge(self.candidate, genome)
        w = merge.start.clone().requires_grad_(True)  # (J, M)
        optimiser = torch.optim.Adam([w], lr=cfg.lr)
        start_score = best = self._held_out(merge, w)
        best_w, stale, passes, steps = w.detach().clone(), 0, 0, 0
        for steps, batch in enumerate(self._minibatches(), start=1):
            loss = self._loss(merge, w, batch)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                w.clamp_(*self.bounds)
            passes += len(batch.examples)
            if steps % cfg.eval_every == 0:
                score = self._held_out(merge, w)
                if score > best:
                    best, best_w, stale = score, w.detach().clone(), 0
                else:
                    stale += 1
                if stale >= cfg.patience:
                    break
        evals = 1 + steps // cfg.eval_every
        stats = {
            "steps": steps,
            "train_passes": passes,  # example forward + backward passes
            "held_out_passes": evals * sum(len(b.examples) for b in self.held),  # forward only
            "seconds": time.perf_counter() - started,
            "objective": cfg.objective,
            # the held-out fold's greedy-match score (nll), or minus its mean entropy (entropy)
            "held_out_start": start_score[0],
            "held_out_refined": best[0],
            "changed": not torch.equal(best_w, merge.start),
        }
        LOG.info("refinement: %s", stats)
        return Refinement(merge.coefficients(best_w), stats)

    def _minibatches(self):
        """`steps` batches of the train fold, reshuffled every epoch (seeded)."""
        rng, order = random.Random(self.seed), list(self.train)
        size = min(self.config.batch, len(order))
        step = 0
        while True:
            rng.shuffle(order)
            for i in range(0, len(order) - size + 1, size):
                if step == self.config.steps:
                    return
                step += 1
                yield make_batch(order[i : i + size])

    def _loss(self, merge: DifferentiableMerge, w: torch.Tensor, batch: TeacherBatch):
        """The batch's mean answer NLL (or mean entropy) plus the pull toward the start."""
        logits = self._logits(merge.merged(w), batch.inputs)
        loss = batch.entropy(logits) if self.entropy else batch.scores(logits)[0]
        return loss.mean() + self.config.l2 * ((w - merge.start) ** 2).sum()

    def _held_out(self, merge: DifferentiableMerge, w: torch.Tensor) -> tuple[float, float]:
        """(combined greedy-match score, -mean NLL) on the held-out fold, or with the entropy
        objective (-mean entropy, 0): larger is better."""
        with torch.no_grad():
            weights = merge.merged(w)
            if self.entropy:
                entropies = [
                    batch.entropy(self._logits(weights, batch.inputs)) for batch in self.held
                ]
                return -float(torch.cat(entropies).mean()), 0.0
            per_task, nll = fold_scores(lambda ids: self._logits(weights, ids), self.held)
        return self.evaluator.value_of(per_task), -nll

    def _logits(self, weights: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        """The live model's logits (B, T, V) with `weights` in place of its parameters."""
        from torch.func import functional_call

        return functional_call(self.model, weights, (inputs,)).logits


def _weight_bounds(space) -> tuple[float, float]:
    """The range the space lets a weight take: its weight genes' bounds, else the declared."""
    genes = [g for g in space.genes if g.param == "weight"]
    if genes:
        return min(g.low for g in genes), max(g.high for g in genes)
    low, high = space.method.param("weight").bounds
    return float(low), float(high)


def make_refiner(config, candidate, evaluator, space) -> Refiner | None:
    """The run's refiner, or None where `search.refine` is off."""
    if config.search.refine is None:
        return None
    return Refiner(config.search.refine, candidate, evaluator, space, seed=config.search.seed)
