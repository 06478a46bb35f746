"""Search spaces: which merge parameters a search explores, and genome <-> recipe.

A space (a file in `search_spaces/`) names a merge method, how layers are grouped, an optional
split of each layer by tensor-name filters, and the bounds of each searched parameter:

    method: dare_ties
    layers_per_group: 2          # null: one group for the whole model
    split: [self_attn, mlp]      # the last part also covers every tensor the others miss
    search: {weight: null, density: [0.1, 1.0]}   # null: the bounds the method declares
    fixed: {normalize: false}

The method's declarations (`evomerge.methods.Param`) are the source of truth: every name must be
one of its parameters (a typo gets the closest name), only float parameters are searched, bounds
default to the declared ones and must lie within the declared limits, and the baseline genomes
come from each parameter's declared role.

A genome is a flat dict of floats with readable names, e.g. `L0-1.self_attn.math.weight` (per
model) or `L2-3.t` (per group). It stands for an ordinary `Recipe` with one slice per layer
group (`recipe`; `decode` gives it as the one stage of the merge), which `evomerge merge` and
mergekit-yaml both run. Every gene is drawn directly inside
its bounds, so the map from genome to recipe is one-to-one and smooth (no folding).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.errors import UserError
from evomerge.merging.multistage import Stage
from evomerge.merging.recipe import (
    ConditionalSetting,
    MethodName,
    Recipe,
    Slice,
    SliceSource,
    registry_errors_as_validation_errors,
    validate_model,
)
from evomerge.methods import MergeMethod, Param, get_method
from evomerge.spaces.base import Gene, check_genome, suggest_genome
from evomerge.spaces.registry import read_space

if TYPE_CHECKING:
    import optuna


class SpaceConfig(BaseModel):
    """A space as its file says, checked against the method's declared parameters when read."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: MethodName
    layers_per_group: int | None = Field(default=None, ge=1)
    split: list[str] = Field(default_factory=list)
    search: dict[str, tuple[float, float] | None] = Field(min_length=1)
    """Bounds of each searched parameter; null: the method's declared bounds."""
    fixed: dict[str, bool | int | float | str] = Field(default_factory=dict)

    @field_validator("search")
    @classmethod
    def _ordered(cls, value):
        for name, bounds in value.items():
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"bounds of {name!r} must be [low, high] with low < high")
        return value

    @model_validator(mode="after")
    def _declared_parameters(self) -> SpaceConfig:
        method = get_method(self.method)
        for name in self.search:
            with registry_errors_as_validation_errors(f"search.{name}"):
                _check_searchable(method, method.param(name))
        for name, value in self.fixed.items():
            with registry_errors_as_validation_errors(f"fixed.{name}"):
                method.param(name).coerce(value, "every tensor")
        for param in method.params:
            if param.required and param.name not in self.search and param.name not in self.fixed:
                raise ValueError(
                    f"merge method {method.name!r} needs {param.name!r} searched or fixed"
                )
        return self


def _check_searchable(method: MergeMethod, param: Param) -> None:
    """Genes are floats (CMA-ES and the smooth genome map need them): an int or a bool is fixed."""
    if param.kind is not float:
        floats = [p.name for p in method.params if p.kind is float]
        raise UserError(
            f"only float parameters can be searched, and {param.name!r} takes "
            f"{param.kind.__name__} values (fix it under 'fixed'); "
            f"the float parameters of {method.name!r}: {', '.join(floats) or 'none'}"
        )


def load_space(source: str | Path | dict, *, base_dir: Path = Path(".")) -> SpaceConfig:
    """A space from a file path (absolute, relative to `base_dir`, or a name in
    `search_spaces/`) or from an inline mapping."""
    data, where = read_space(source, base_dir=base_dir)
    return validate_model(SpaceConfig, data, where)


class SearchSpace:
    """Genes and decoding for one pool: `models` maps short names to model folders."""

    kind = "parameters"  # a space file that names no kind (evomerge.spaces.registry)

    def __init__(
        self,
        config: SpaceConfig,
        *,
        base: str,
        models: dict[str, str],
        num_layers: int,
        dtype: str | None,
    ):
        self.config, self.base, self.models, self.dtype = config, base, models, dtype
        self.method: MergeMethod = get_method(config.method)
        self.statistics: dict[str, str] | None = None
        """Model folder -> its input statistics file, for a method that reads them."""
        self.vocabulary: dict[str, Any] = {}
        """The output tokenizer's recipe keys, which every recipe carries: `tokenizer_source`
        or `tokenizer` where the pool's vocabularies are aligned, and `chat_template` where the
        run config sets `pool.chat_template` (`build_space` fills them in)."""
        self.title = self.method.name  # what the report calls the space
        self.num_layers = num_layers
        self._check_pool()
        self.groups = self._layer_groups()
        self.genes = self._genes()

    # --- layout --------------------------------------------------------------------------
    def _check_pool(self) -> None:
        if self.method.max_models is not None and len(self.models) > self.method.max_models:
            raise UserError(
                f"search space: {self.method.name!r} merges at most {self.method.max_models} "
                f"model(s) besides the base; the pool has {len(self.models)}"
            )

    def _layer_groups(self) -> list[tuple[str, int, int]]:
        size = self.config.layers_per_group or self.num_layers
        groups = []
        for start in range(0, self.num_layers, size):
            end = min(start + size, self.num_layers)
            label = "all" if size >= self.num_layers else f"L{start}-{end - 1}"
            groups.append((label, start, end))
        return groups

    def _bounds(self, name: str) -> tuple[float, float]:
        param = self.method.param(name)
        bounds = self.config.search[name] or param.bounds
        if bounds is None:
            raise UserError(f"search space: give bounds for {name!r}")
        if not all(math.isfinite(b) for b in bounds):
            raise UserError(f"search space: the bounds of {name!r} must be finite numbers")
        for bound in bounds:
            param.check_limits(float(bound), "in the search space")
        return float(bounds[0]), float(bounds[1])

    def _genes(self) -> list[Gene]:
        genes = []
        parts = self.config.split or [None]
        for label, _, _ in self.groups:
            for name in self.config.search:
                param = self.method.param(name)
                low, high = self._bounds(name)
                for part in parts:
                    prefix = label if part is None else f"{label}.{part}"
                    if param.per_model:
                        for model in self.models:
                            genes.append(
                                Gene(
                                    f"{prefix}.{model}.{name}", low, high, label, part, model, name
                                )
                            )
                    else:
                        genes.append(Gene(f"{prefix}.{name}", low, high, label, part, None, name))
        return genes

    def suggest(self, trial: optuna.Trial) -> dict[str, float]:
        """The genome of `trial`, drawn by the study's sampler."""
        return suggest_genome(trial, self.genes)

    # --- decoding ------------------------------------------------------------------------
    def decode(self, genome: dict[str, float]) -> list[Stage]:
        """The merge a genome stands for: one unnamed stage, its `recipe`."""
        return [Stage(None, self.recipe(genome))]

    def recipe(self, genome: dict[str, float]) -> Recipe:
        """The recipe a genome stands for: one slice per layer group."""
        check_genome(genome, self.genes)
        slices = []
        for label, start, end in self.groups:
            sources = [
                SliceSource(
                    model=path,
                    layer_range=(start, end),
                    parameters=self._settings(genome, label, model) or None,
                )
                for model, path in self.models.items()
            ]
            if self.method.base_role != "input":
                sources.append(SliceSource(model=self.base, layer_range=(start, end)))
            slices.append(
                Slice(sources=sources, parameters=self._settings(genome, label, None) or None)
            )
        return Recipe(
            merge_method=self.method.name,
            slices=slices,
            base_model=self.base if self.method.base_role != "input" else None,
            parameters=dict(self.config.fixed) or None,
            dtype=self.dtype,
            statistics=self.statistics,
            **self.vocabulary,
        )

    def _settings(self, genome: dict[str, float], label: str, model: str | None) -> dict[str, Any]:
        out = {}
        for name in self.config.search:
            if self.method.param(name).per_model != (model is not None):
                continue
            genes = [
                g for g in self.genes if g.group == label and g.model == model and g.param == name
            ]
            if len(genes) == 1:
                out[name] = genome[genes[0].name]
            else:  # split: filters in order, the last one catches everything else
                out[name] = [
                    ConditionalSetting(
                        filter=g.part if i < len(genes) - 1 else None, value=genome[g.name]
                    )
                    for i, g in enumerate(genes)
                ]
        return out

    # --- baselines -----------------------------------------------------------------------
    def baselines(self) -> dict[str, dict[str, float]]:
        """Named genomes of the classic recipes, where the space can express them: each gene
        takes its value from the role its parameter declares (a gene without one, or a value
        outside its bounds, and the recipe is left out)."""
        out = {}
        for label, by_role in classic_recipes(self.method, list(self.models)).items():
            genome = self.genome_of(by_role)
            if genome is not None:
                out[label] = genome
        for label, by_role in task_arithmetic_scalings(self.method).items():
            genome = self.genome_of(by_role)
            if genome is not None and genome not in out.values():  # not queued twice
                out[label] = genome
        return out

    def genome_of(self, by_role: dict[str, Any]) -> dict[str, float] | None:
        """The genome whose genes take the values `by_role` gives their parameters' roles (a
        value, or a function of the gene's model); None where a gene has no value in bounds."""
        genome = {}
        for gene in self.genes:
            value = by_role.get(self.method.param(gene.param).role)
            value = value(gene.model) if callable(value) else value
            if value is None or not gene.low <= value <= gene.high:
                return None
            genome[gene.name] = float(value)
        return genome


TASK_ARITHMETIC_SCALINGS = (0.3, 0.5, 0.7, 1.0)
"""lambda of the classic task-arithmetic baselines (Ilharco et al.): equal weights, scaled."""


def task_arithmetic_scalings(method: MergeMethod) -> dict[str, dict[str, Any]]:
    """Task arithmetic's classic scalings, every task vector at lambda (merges of adapters and
    fine-tunes often do best near 0.5-0.7 each, far from uniform's 1/n), for a task-vector
    method that does not divide by the sum of the weights (for one that does, a scaling of equal
    weights is the uniform merge again)."""
    normalizes = any(p.name == "normalize" and p.default is True for p in method.params)
    if method.task_vectors is None or normalizes:
        return {}
    return {
        f"lambda_{scale:g}": {"weight": scale, "density": 1.0, "interpolation": 0.5}
        for scale in TASK_ARITHMETIC_SCALINGS
    }


def classic_recipes(method: MergeMethod, models: list[str]) -> dict[str, dict[str, Any]]:
    """Role -> value (or model -> value) of each classic recipe; roles as in `methods.Role`."""
    n = len(models)
    recipes: dict[str, dict[str, Any]] = {
        "uniform": {"weight": lambda m: 1.0 / n, "density": 1.0, "interpolation": 0.5},
    }
    recipes.update(method.baselines)  # the method's own classic recipes
    for model in models if method.one_hot_is_model else ():
        recipes[f"only_{model}"] = {
            "weight": lambda m, me=model: 1.0 if m == me else 0.0,
            "density": 1.0,
            "interpolation": 1.0,
        }
    return recipes
