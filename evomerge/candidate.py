"""Merge candidates materialised straight into a live model, with no disk in the loop.

Set-up (once per run): open the pool, read every source tensor onto the device in the merge
dtype, and keep one `MergeInputs` per output tensor. Those memoise what does not change
between trials (task vectors, magnitude ranks, random draws) on first use.
Per trial: resolve the candidate recipe's parameters, run the merge method on the resident
inputs, and copy each result into the evaluation model's parameter in place.

Both this and `evomerge merge` go through `evomerge.merge.load_inputs` / `run_method`, so the
exported model is bit for bit the one that was scored.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from evomerge.checkpoint import Checkpoint
from evomerge.merge import all_finite, load_inputs, run_method
from evomerge.plan import plan_merge
from evomerge.recipe import Recipe

if TYPE_CHECKING:
    import torch

LOG = logging.getLogger(__name__)


class CandidateError(Exception):
    """A candidate that cannot be scored (non-finite weights, ...): the trial fails, the
    search goes on."""


class LiveCandidate:
    """Writes merge candidates into `model`'s parameters in place."""

    def __init__(self, model: "torch.nn.Module", template: Recipe, *, seed: int, device: str = "cpu"):
        plan = plan_merge(template)
        self.checkpoints: dict[str, Checkpoint] = plan.checkpoints
        self.seed = seed
        self.inputs = {job.out_name: load_inputs(plan, job, seed=seed, device=device) for job in plan.jobs}
        for inputs in self.inputs.values():
            inputs.reused = True
        state = dict(model.named_parameters())
        state.update(dict(model.named_buffers()))
        missing = [name for name in self.inputs if name not in state]
        if missing:
            raise ValueError(f"the evaluation model has no parameters {missing[:3]}")
        self.targets = {name: state[name] for name in self.inputs}
        for name, inputs in self.inputs.items():
            inputs.destination = self.targets[name]  # methods that can write in place do

    def apply(self, recipe: Recipe) -> None:
        """Materialise `recipe` into the live model."""
        import torch

        plan = plan_merge(recipe, checkpoints=self.checkpoints)
        with torch.no_grad():
            for job in plan.jobs:
                merged = run_method(plan, job, self.inputs[job.out_name])
                if not all_finite(merged):
                    raise CandidateError(f"the merged tensor {job.out_name!r} has NaN or Inf values")
                target = self.targets[job.out_name]
                if merged is not target:
                    target.copy_(merged)
