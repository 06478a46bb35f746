"""`search.refine`: learned per-tensor weights after the black-box budget, and what it accepts.

    search:
      refine: gradient                  # or a mapping: {steps: 60, lr: 0.02, ...}; null: off
      refine: {objective: entropy}      # unsupervised: no answers read (tasks without targets)

Read with the run config (no torch): the space must be a task-vector parameter space, the
fitness backend `hf` and the objective combined, or the config is refused with one sentence.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.errors import UserError

TASK_VECTOR_METHODS = (
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "regmean",
)
"""The methods whose per-model weights refinement learns: the task-vector family (the methods
with `MergeMethod.task_vectors`) and RegMean (a weighted sum of projected task vectors); a test
keeps the list equal to the registry's."""

STATISTICS_METHODS = ("regmean",)
"""The methods that read each model's input statistics (`MergeMethod.statistics`)."""

SUPPORTED = (
    f"search.refine: gradient learns per-tensor weights of parameter spaces over the "
    f"task-vector methods ({', '.join(TASK_VECTOR_METHODS)}) with the hf backend and one "
    "combined objective"
)


class RefineConfig(BaseModel):
    """How the best black-box trial is refined (`evomerge.search.refine`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: Literal["gradient"] = "gradient"
    steps: int = Field(default=60, ge=1)
    """Optimiser steps at most (each one forward and backward pass over `batch` examples)."""
    lr: float = Field(default=0.1, gt=0, allow_inf_nan=False)
    """Adam's step size on the weights."""
    batch: int = Field(default=64, ge=1)
    held_out: float = Field(default=0.3, gt=0, lt=1)
    """The share of each task's dev documents kept apart for early stopping."""
    l2: float = Field(default=0.001, ge=0, allow_inf_nan=False)
    """Pull toward the starting weights: l2 * sum (w - w_start)^2."""
    eval_every: int = Field(default=5, ge=1)
    patience: int = Field(default=4, ge=1)
    """Stop after this many held-out checks without a better one."""
    objective: Literal["nll", "entropy"] = "nll"
    """What the weights minimise on the train fold: `nll`, the teacher-forced answer NLL (early
    stopping reads the held-out fold's greedy-match score); `entropy`, AdaMerging's
    unsupervised objective, the mean entropy of the next-token distribution where each answer
    starts (the held-out fold's mean entropy stops it): no target is read, so it also refines
    for tasks that have none."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"method": data} if isinstance(data, str) else data


def parse_refine(value: Any) -> Any:
    """`refine: gradient` -> the defaults; `refine: null`/`off`/`false` -> None (no refinement)."""
    if value in (None, False, "off", "none"):
        return None
    return value


def check_statistics(space: Any, *, backend: str, models: dict) -> None:
    """A UserError (one sentence) where the space's method reads input statistics (RegMean)
    that this run cannot collect: they come from the dev documents through the hf backend, on
    full models."""
    from evomerge.spaces.registry import read_space

    try:
        data, _ = read_space(space)
    except UserError:
        return  # a missing space file is reported where the space is built
    method = data.get("method") if isinstance(data, dict) else None
    if method not in STATISTICS_METHODS:
        return
    why = (
        f"a {method} space collects each model's input statistics from the dev documents, "
        "which needs fitness.backend: hf and full models"
    )
    if backend != "hf":
        raise UserError(f"{why}; the fitness backend is {backend!r}")
    adapters = [name for name, path in models.items() if "+" in str(path)]
    if adapters:
        raise UserError(f"{why}; {adapters[0]!r} is a LoRA adapter")


def check_refinable(space: Any, *, backend: str, objectives: str, models: dict) -> None:
    """A UserError (one sentence naming what refinement supports) unless the run can refine."""
    from evomerge.spaces.parameters.space import read_space

    try:
        data, _ = read_space(space)
    except UserError:
        return  # a missing space file is reported where the space is built
    kind = data.get("kind") if isinstance(data, dict) else None
    method = data.get("method") if isinstance(data, dict) else None
    if kind is not None:
        raise UserError(f"{SUPPORTED}; the space is of kind {kind!r}")
    if method not in TASK_VECTOR_METHODS:
        raise UserError(f"{SUPPORTED}; the space's method is {method!r}")
    if backend != "hf":
        raise UserError(f"{SUPPORTED}; the fitness backend is {backend!r}")
    if objectives != "combined":
        raise UserError(f"{SUPPORTED}; the objectives are {objectives!r}")
    adapters = [name for name, path in models.items() if "+" in str(path)]
    if adapters:
        raise UserError(f"{SUPPORTED}; {adapters[0]!r} is a LoRA adapter, not a full model")
