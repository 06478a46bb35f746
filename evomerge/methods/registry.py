"""The one registry of merge methods and the parameters each one declares.

A method is a pure function over tensors plus a declaration of its parameters: name, whether it
is set per model or once, its default, its kind, the range a search may explore and the role it
plays in the classic baseline recipes. Recipes are checked against that declaration (an unknown
name is refused with the closest one), the recipe planner resolves parameters from it and the
search builds its space and baselines from it, so adding a method is one function and one
`register(...)` call. The names are mergekit 0.1.5's for the same method.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from evomerge.errors import UserError

if TYPE_CHECKING:
    import torch

    from evomerge.methods.random_fields import UniformField

REQUIRED = object()

# What a parameter means to a search, beyond its name: the classic recipes it starts from
# (`SearchSpace.baselines`) are written in these terms, so they apply to any method declaring them.
#   "weight"        — a per-model mixing weight (uniform: 1/n each; one model alone: one-hot);
#   "density"       — the fraction of a task vector kept (1 keeps all of it);
#   "interpolation" — the position from the base (0) to the one other model (1), SLERP's t.
Role = Literal["weight", "density", "interpolation"]


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method.

    `per_model` parameters take one value per input model (`weight`, `density`); the others
    one value per tensor (`t`, `lambda`). `bounds` is the range a search explores by default;
    `limits` the range that makes sense at all (a density is a fraction): recipes and search
    spaces outside it are refused. Numbers must be finite. `role` says what the parameter means
    to a search (see `Role`); only `float` parameters can be searched.
    """

    name: str
    per_model: bool
    default: Any = REQUIRED
    kind: type = float
    bounds: tuple[float, float] | None = None
    limits: tuple[float, float] | None = None
    role: Role | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def coerce(self, value: Any, where: str) -> Any:
        """Check and convert a resolved recipe value (YAML may give `1e-3` as a string)."""
        try:
            if self.kind is bool:
                if isinstance(value, bool):
                    return value
                if str(value).lower() in ("true", "false"):
                    return str(value).lower() == "true"
                raise ValueError
            if self.kind is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                return int(value)
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
        except (TypeError, ValueError):
            raise UserError(
                f"parameter {self.name!r} for {where} must be a finite {self.kind.__name__}, "
                f"got {value!r}"
            ) from None
        self.check_limits(number, f"for {where}")
        return number

    def check_limits(self, value: float, where: str) -> None:
        if self.limits is not None and not self.limits[0] <= value <= self.limits[1]:
            low, high = self.limits
            raise UserError(
                f"parameter {self.name!r} {where} must lie in [{low:g}, {high:g}], got {value!r}"
            )


# How a member of the task-vector family trims each task vector before they are combined:
#   None — keeps all of it; "magnitude" — the largest |tau| (TIES); "random" — a random draw
#   rescaled (DARE); "breadcrumbs" — drops the largest and the smallest; "della" — by rank in
#   its row, at random.
Sparsifier = Literal["magnitude", "random", "breadcrumbs", "della"] | None


@dataclass(frozen=True)
class TaskVectorRules:
    """What makes a method one of the task-vector family (methods/task_arithmetic.py): its
    sparsification rule and whether models vote on signs (TIES's consensus). Code that runs the
    family another way (the fused kernel, evomerge/kernel/task_vectors.py) reads these fields
    off the method, so a new member needs no table elsewhere."""

    sparsify: Sparsifier
    consensus: bool


# How a method treats `base_model`:
#   "input"    — the base is one more input, like any listed model (linear, karcher, ...);
#   "required" — the method merges differences from the base and needs one;
#   "optional" — the method uses a base when the recipe names one.
BaseRole = Literal["input", "required", "optional"]


class MergeInputs:
    """What a method sees for one output tensor.

    `models` are the non-base inputs in recipe order (for base role "input": every input).
    `field` draws reproducible random numbers for methods that need them (DARE, DELLA).
    `peaks` (optional) are max |x| of each model, then the base, when the caller knows them
    already (the merge executor finds them while checking the inputs are finite).
    `grams` (for a method that declares `statistics`) give each model's input statistics for
    this tensor (RegMean's X_i^T X_i / N, shape (in, in)), None for a model that has none: a
    list, or a function that reads them (`statistics()` calls it; a search's resident inputs
    then hold no statistics, only what the method derives from them).

    Everything derived from the inputs alone (task vectors, magnitude ranks, random draws) is
    computed on first use and kept for as long as this object lives: a plain merge uses it
    once, the search keeps one per tensor for the whole run.
    """

    def __init__(
        self,
        models: list[torch.Tensor],
        base: torch.Tensor | None,
        tensor_name: str,
        field: UniformField | None = None,
        peaks: list[float | None] | None = None,
        grams: list[torch.Tensor | None] | Callable[[], list[torch.Tensor | None]] | None = None,
    ):
        self.models, self.base, self.tensor_name, self.field = models, base, tensor_name, field
        self.grams = grams
        self._memo: dict[tuple[str, int], Any] = {}
        for index, peak in enumerate(peaks or []):
            if peak is not None:
                self._memo["peak", index] = peak

    def statistics(self) -> list[torch.Tensor | None] | None:
        """Each model's input statistics for this tensor (read now where `grams` reads them)."""
        return self.grams() if callable(self.grams) else self.grams

    def cached(self, kind: str, index: int, compute: Callable[[], Any]):
        """`compute()` on first use for (kind, model index); the kept value afterwards."""
        key = (kind, index)
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def keep_task_vectors_only(self) -> None:
        """Form every task vector and peak now, then let go of the models themselves.

        A model is its base plus its task vector, so a search's resident tensor that merges
        through task vectors needs theta_i no more; keeping both would hold one more model-size
        per source for the whole run. Afterwards `models` holds None for each model."""
        for index in range(len(self.models)):
            self.peak(index)
            self.delta(index)
        self.models = [None] * len(self.models)

    def view(self) -> MergeInputs:
        """The same inputs, sharing their task vectors and peaks, keeping whatever else it
        derives (ranks, draws) to itself: freed with the view, not kept for the run."""
        shared = MergeInputs(self.models, self.base, self.tensor_name, self.field, grams=self.grams)
        shared._memo = {
            key: v for key, v in self._memo.items() if key[0] in ("delta", "peak", "projected")
        }
        return shared

    def peak(self, index: int) -> float:
        """max |theta| of model `index` (index `len(models)`: the base)."""
        tensor = self.models[index] if index < len(self.models) else self.base
        return self.cached("peak", index, lambda: abs_peak(tensor))

    def tau_bound(self, index: int) -> float:
        """max |theta_i| + max |theta_base|: a bound on |tau_i| known without a pass over the
        task vector. It sizes the exact L1 sums of DARE's rescale (sparsify.fixed_point_shift)."""
        return self.peak(index) + self.peak(len(self.models))

    def delta(self, index: int) -> torch.Tensor:
        """The task vector tau_i = theta_i - theta_base."""
        return self.cached("delta", index, lambda: self.models[index] - self.base)

    def magnitude_ranks(self, index: int) -> torch.Tensor:
        from evomerge.methods.sparsify import magnitude_ranks

        return self.cached("desc", index, lambda: magnitude_ranks(self.delta(index)))

    def ascending_ranks(self, index: int) -> torch.Tensor:
        from evomerge.methods.sparsify import ascending_ranks

        return self.cached("asc", index, lambda: ascending_ranks(self.delta(index)))

    def row_ranks(self, index: int) -> torch.Tensor:
        from evomerge.methods.sparsify import row_ranks

        return self.cached("rows", index, lambda: row_ranks(self.delta(index)))

    def draws(self, index: int) -> torch.Tensor:
        """16-bit random integers for every element of model `index`'s tensor."""
        like = self.models[index] if self.models[index] is not None else self.delta(index)
        shape, device = like.shape, like.device
        return self.cached("draws", index, lambda: self.field.integers(index, shape, device))


def abs_peak(tensor: torch.Tensor) -> float:
    """max |x| by min and max, one pass (NaN if x holds a NaN, Inf for an Inf)."""
    import torch

    if tensor.numel() == 0:
        return 0.0
    low, high = torch.aminmax(tensor.flatten())
    return torch.maximum(-low, high).item()  # maximum propagates NaN


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: its function and what it declares.

    `task_vectors`: its rules, for a member of the task-vector family (None otherwise).
    `baselines`: classic recipes of this method a search queues besides the uniform merge and
    each model alone, as label -> value of each parameter role (`Role`), e.g. DARE-TIES's
    `{"dare_ties_0.5": {"weight": 0.5, "density": 0.5, ...}}`.
    `one_hot_is_model`: whether weight 1 on one model and 0 on the rest gives that model back
    (the "only_<model>" baselines are queued only then; RegMean's weights scale projected task
    vectors, so its one-hot merge is not the model).
    `statistics`: whether the method reads each model's input statistics (`MergeInputs.grams`),
    which a recipe names in its `statistics` mapping.
    `mergekit`: whether mergekit 0.1.5 has the method (under the same name, with the same
    parameters), i.e. whether `mergekit-yaml` runs its recipes; False for evomerge's own."""

    name: str
    merge: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    base_role: BaseRole
    min_models: int = 1
    max_models: int | None = None
    randomized: bool = False
    reference: str = ""
    task_vectors: TaskVectorRules | None = None
    baselines: dict[str, dict[Role, float]] = field(default_factory=dict, compare=False)
    one_hot_is_model: bool = True
    statistics: bool = False
    mergekit: bool = True

    def param(self, name: str) -> Param:
        """The parameter called `name`, or a `UserError` naming the closest one."""
        for param in self.params:
            if param.name == name:
                return param
        names = [p.name for p in self.params]
        raise UserError(
            f"merge method {self.name!r} has no parameter {name!r}{_closest(name, names)}"
        )

    @property
    def per_model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)

    @property
    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """The method called `name`, or a `UserError` naming the closest one."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(
            f"unknown merge method {name!r}{_closest(name, sorted(_REGISTRY))}"
        ) from None


def _closest(name: str, known: list[str]) -> str:
    """The tail of a message about an unknown `name`: `; did you mean 'x'? (known: ...)`."""
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (known: {', '.join(known) or 'none'})"


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def registered_methods() -> list[MergeMethod]:
    """Every method, in the order they were registered."""
    return list(_REGISTRY.values())
