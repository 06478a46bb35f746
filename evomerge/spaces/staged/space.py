"""Spaces whose candidates are multi-stage recipes: a merge method chosen per layer group, and
a pairwise sequence of merges whose order is searched.

mergekit 0.1.5 runs one merge method per recipe, so both spaces decode to mergekit-multi's
named stages (`evomerge.merging.multistage`), which `evomerge merge` and mergekit-multi both run:

- `kind: method_per_group` (`methods: [task_arithmetic, ties]`): a categorical gene per layer
  group picks its method; the float genes are those of each method's ordinary space, a
  parameter several methods declare (weight) being one gene they share. The recipe: one stage
  per chosen method (that method's ordinary whole-model recipe) and a final `passthrough` that
  takes each group's layers from its method's stage. Embeddings come from the first group's
  stage and norms and head from the last group's, which is where a one-method recipe takes
  their parameters from (its first and last slices).
- `kind: pairwise` (`method: slerp`): the pool's models merged two at a time, A+B, then
  (A+B)+C, ..., with a categorical gene for the order. Stage s is the method's ordinary space
  over two models with genes of its own (`S1.L0-1.t`, `S2.L0-1.prev.weight`): a method that
  merges one model into a base (slerp) takes the earlier result as the base and the next model
  as the model; any other takes the pool's base and the two as its models (`prev`, `next`).

The output tokenizer's recipe keys (`vocabulary`: the run config's `pool.tokenizer_source` or
`pool.tokenizer`, and `pool.chat_template`) go into every stage that reads the pool. A method-per-
group space aligns differing vocabularies: each method's stage is a recipe over the whole pool,
so all stages share the output vocabulary and the final passthrough takes their rows as they
are. A pairwise space does not (see its kind's `why_not_aligned`).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import UserError
from evomerge.merging.multistage import Stage
from evomerge.merging.recipe import (
    MethodName,
    Recipe,
    Slice,
    SliceSource,
    describe_validation_error,
)
from evomerge.methods import get_method
from evomerge.spaces.base import Gene, check_genome, suggest_genome
from evomerge.spaces.parameters.space import SearchSpace, SpaceConfig, classic_recipes

MAX_MODELS = 6  # 720 orders, each one value of a categorical gene


class MethodPerGroupConfig(BaseModel):
    """A `search_spaces/*.yaml` file with `kind: method_per_group`: as a parameter space, with
    `methods` (the choices of each group) instead of `method`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["method_per_group"]
    methods: list[MethodName] = Field(min_length=2)
    layers_per_group: int | None = Field(default=None, ge=1)
    split: list[str] = Field(default_factory=list)
    search: dict[str, tuple[float, float] | None] = Field(min_length=1)
    fixed: dict[str, bool | int | float | str] = Field(default_factory=dict)

    @field_validator("methods")
    @classmethod
    def _distinct(cls, value):
        repeated = sorted({m for m in value if value.count(m) > 1})
        if repeated:
            raise ValueError(f"{repeated[0]!r} is listed twice")
        return value

    @model_validator(mode="after")
    def _each_method_a_space(self) -> MethodPerGroupConfig:
        declared = {name for m in self.methods for name in (p.name for p in get_method(m).params)}
        for where, names in (("search", self.search), ("fixed", self.fixed)):
            for name in names:
                if name not in declared:
                    raise ValueError(
                        f"{where}.{name}: none of the methods ({', '.join(self.methods)}) "
                        f"has a parameter {name!r}"
                    )
        for method in self.methods:
            _collects_no_statistics(method, "a method_per_group space")
            self.method_config(method)
        return self

    def method_config(self, method: str) -> SpaceConfig:
        """The ordinary space of one of the methods: the searched and fixed parameters it
        declares."""
        names = {p.name for p in get_method(method).params}
        searched = {k: v for k, v in self.search.items() if k in names}
        if not searched:
            raise ValueError(
                f"method {method!r} declares none of the searched parameters "
                f"({', '.join(self.search)})"
            )
        data = {
            "method": method,
            "layers_per_group": self.layers_per_group,
            "split": self.split,
            "search": searched,
            "fixed": {k: v for k, v in self.fixed.items() if k in names},
        }
        try:
            return SpaceConfig.model_validate(data)
        except ValidationError as exc:
            raise ValueError(
                f"as method {method!r}: {describe_validation_error(exc, SpaceConfig, data)}"
            ) from None


def _collects_no_statistics(method: str, where: str) -> None:
    """A ValueError where `method` reads input statistics (RegMean): a search collects them
    for the models of a single-method space, not per stage or per group."""
    if get_method(method).statistics:
        raise ValueError(
            f"{method} reads each model's input statistics, which a search collects for a "
            f"single-method space only, not for {where}; search it with its own space "
            f"(e.g. {method}_layers)"
        )


class PairwiseConfig(SpaceConfig):
    """A `search_spaces/*.yaml` file with `kind: pairwise`: an ordinary parameter space (the
    method of every stage), merged two models at a time."""

    kind: Literal["pairwise"]

    @model_validator(mode="after")
    def _no_statistics(self) -> PairwiseConfig:
        _collects_no_statistics(self.method, "a pairwise space")
        return self

    def stage_config(self) -> SpaceConfig:
        return SpaceConfig.model_validate(self.model_dump(exclude={"kind"}))


class MethodPerGroupSpace:
    """Genes and decoding of method-per-group candidates over one pool."""

    kind = "method_per_group"

    def __init__(
        self,
        config: MethodPerGroupConfig,
        *,
        base: str,
        models: dict[str, str],
        num_layers: int,
        dtype: str | None,
    ):
        self.config, self.dtype = config, dtype
        self.spaces = {
            m: SearchSpace(
                config.method_config(m),
                base=base,
                models=models,
                num_layers=num_layers,
                dtype=dtype,
            )
            for m in config.methods
        }
        self.title = " | ".join(config.methods)
        self.groups = next(iter(self.spaces.values())).groups
        choices = tuple(config.methods)
        self.genes = [
            Gene(f"{label}.method", 0.0, 0.0, label, None, None, "method", choices)
            for label, _, _ in self.groups
        ]
        self.genes += _shared_genes(self.spaces)

    @property
    def vocabulary(self) -> dict[str, Any]:
        """The output tokenizer's recipe keys, which every method's stage carries (the final
        passthrough reads stages already in the output vocabulary: only the chat template)."""
        return next(iter(self.spaces.values())).vocabulary

    @vocabulary.setter
    def vocabulary(self, keys: dict[str, Any]) -> None:
        for space in self.spaces.values():
            space.vocabulary = dict(keys)

    def suggest(self, trial) -> dict[str, float | str]:
        return suggest_genome(trial, self.genes)

    def chosen(self, genome: dict[str, Any]) -> dict[str, list[str]]:
        """Method -> the labels of the groups that chose it, for the methods chosen at all."""
        out: dict[str, list[str]] = {}
        for label, _, _ in self.groups:
            out.setdefault(genome[f"{label}.method"], []).append(label)
        return {m: out[m] for m in self.config.methods if m in out}

    def decode(self, genome: dict[str, Any]) -> list[Stage]:
        """A stage per chosen method, and the passthrough that picks each group's layers from its
        method's stage (a single stage where every group chose one method)."""
        check_genome(genome, self.genes)
        chosen = self.chosen(genome)
        stages = [Stage(_stage_name(m), self.spaces[m].recipe(genome)) for m in chosen]
        if len(stages) == 1:
            return [Stage(None, stages[0].recipe)]
        slices = [
            Slice(
                sources=[
                    SliceSource(
                        model=_stage_name(genome[f"{label}.method"]), layer_range=(start, end)
                    )
                ]
            )
            for label, start, end in self.groups
        ]
        template = {k: v for k, v in self.vocabulary.items() if k == "chat_template"}
        final = Recipe(merge_method="passthrough", slices=slices, dtype=self.dtype, **template)
        return stages + [Stage(None, final)]

    def baselines(self) -> dict[str, dict[str, Any]]:
        """Each method's classic recipes in every group (the first method's `only_*`, which are
        the specialists themselves, not repeated for the others); genes the method does not use
        take the other methods' values for the same recipe, else the middle of their bounds."""
        out = {}
        first = self.config.methods[0]
        for method, space in self.spaces.items():
            for label, by_role in classic_recipes(space.method, list(space.models)).items():
                if method != first and label.startswith("only_"):
                    continue
                genome = _genome_from(method, by_role, self.spaces)
                if genome is not None:
                    genome.update({f"{g}.method": method for g, _, _ in self.groups})
                    name = (
                        label
                        if method == first or label.startswith(method)
                        else f"{method}_{label}"
                    )
                    out[name] = {
                        g.name: genome.get(g.name, (g.low + g.high) / 2) for g in self.genes
                    }
        return out


def _stage_name(method: str) -> str:
    """Not the method's own name: mergekit-multi reads any string of a recipe that equals a
    stage's name (`merge_method: ties` too) as a reference to that stage."""
    return f"by_{method}"


def _shared_genes(spaces: dict[str, SearchSpace]) -> list[Gene]:
    """The methods' float genes, one per name: a name two methods share must have one range."""
    genes: dict[str, tuple[str, Gene]] = {}
    for method, space in spaces.items():
        for gene in space.genes:
            if gene.name not in genes:
                genes[gene.name] = (method, gene)
            elif (genes[gene.name][1].low, genes[gene.name][1].high) != (gene.low, gene.high):
                other, known = genes[gene.name]
                raise UserError(
                    f"search space: {gene.param!r} ranges over [{known.low:g}, {known.high:g}] "
                    f"in {other!r} and "
                    f"[{gene.low:g}, {gene.high:g}] in {method!r}; give its bounds under 'search'"
                )
    return [gene for _, gene in genes.values()]


def _genome_from(
    method: str, by_role: dict[str, Any], spaces: dict[str, SearchSpace]
) -> dict[str, float] | None:
    genome = spaces[method].genome_of(by_role)
    if genome is None:
        return None
    for other in spaces.values():
        for name, value in (other.genome_of(by_role) or {}).items():
            genome.setdefault(name, value)
    return genome


class PairwiseSpace:
    """Genes and decoding of pairwise sequences over one pool."""

    kind = "pairwise"

    def __init__(
        self,
        config: PairwiseConfig,
        *,
        base: str,
        models: dict[str, str],
        num_layers: int,
        dtype: str | None,
    ):
        self.config, self.base, self.models, self.num_layers, self.dtype = (
            config,
            base,
            models,
            num_layers,
            dtype,
        )
        self.method = get_method(config.method)
        self.title = f"{config.method} in pairs"
        if len(models) < 3:
            raise UserError(
                "a pairwise sequence needs at least three models besides the base "
                f"(the pool has {len(models)}); "
                "with fewer it is the one-shot merge"
            )
        if any(">" in name for name in models):
            raise UserError(
                "pool model names may not contain '>' in a pairwise space "
                "(it joins an order's names)"
            )
        if len(models) > MAX_MODELS:
            raise UserError(
                f"a pairwise sequence orders at most {MAX_MODELS} models "
                f"(the pool has {len(models)})"
            )
        self.orders = tuple(">".join(order) for order in itertools.permutations(models))
        self.into_base = self.method.max_models == 1  # slerp: the earlier result is the base
        self.stage_config = config.stage_config()
        self.vocabulary: dict[str, Any] = {}
        """The output tokenizer's recipe keys that every stage carries (a chat template: the
        kind refuses aligned vocabularies)."""
        self.stages = len(models) - 1
        probe = self._stage_space(1, "", "")
        self.groups = probe.groups
        self.genes = [Gene("order", 0.0, 0.0, "all", None, None, "order", self.orders)]
        for s in range(1, self.stages + 1):
            self.genes += [_of_stage(g, f"S{s}") for g in probe.genes]

    def suggest(self, trial) -> dict[str, float | str]:
        return suggest_genome(trial, self.genes)

    def _stage_space(self, s: int, prev: str, nxt: str) -> SearchSpace:
        """Stage s as an ordinary space: `prev` (the earlier result or the first model) and
        `nxt` merged by the method, through the base slot where the method merges one model."""
        base, models = (
            (prev, {"next": nxt}) if self.into_base else (self.base, {"prev": prev, "next": nxt})
        )
        space = SearchSpace(
            self.stage_config,
            base=base,
            models=models,
            num_layers=self.num_layers,
            dtype=self.dtype,
        )
        space.vocabulary = self.vocabulary
        return space

    def decode(self, genome: dict[str, Any]) -> list[Stage]:
        """Stages S1..S(n-1): S1 merges the order's first two models, each later stage the one
        before it and the next model; the last stage is the final merge."""
        check_genome(genome, self.genes)
        names = genome["order"].split(">")
        stages = []
        prev = self.models[names[0]]
        for s, name in enumerate(names[1:], start=1):
            space = self._stage_space(s, prev, self.models[name])
            prefix = f"S{s}."
            recipe = space.recipe(
                {k[len(prefix) :]: v for k, v in genome.items() if k.startswith(prefix)}
            )
            label = f"S{s}" if s < self.stages else None
            stages.append(Stage(label, recipe))
            prev = label
        return stages

    def baselines(self) -> dict[str, dict[str, Any]]:
        """`uniform`: the pool's order, each stage giving the next model its share 1/(s+1) (so
        every model ends with an equal share); `only_X`: X last, the last stage taking X alone."""
        names = list(self.models)
        out = {}
        for label in ["uniform"] + [f"only_{m}" for m in names]:
            last = label.removeprefix("only_") if label != "uniform" else None
            order = [m for m in names if m != last] + ([last] if last else [])
            genome: dict[str, Any] = {"order": ">".join(order)}
            for s in range(1, self.stages + 1):
                share = 1.0 if last and s == self.stages else 1.0 / (s + 1)
                stage = self._stage_space(s, "", "").genome_of(_shares(share))
                if stage is None:
                    break
                genome.update({f"S{s}.{k}": v for k, v in stage.items()})
            else:
                out[label] = genome
        return out


def _shares(share: float) -> dict[str, Any]:
    """Role values of a stage that gives the next model `share` and the earlier result the rest."""
    return {
        "weight": lambda model: share if model == "next" else 1.0 - share,
        "interpolation": share,
        "density": 1.0,
    }


def _of_stage(gene: Gene, stage: str) -> Gene:
    """Stage `stage`'s copy of a gene of the stage space (`S1.L0-1.t`)."""
    return dataclasses.replace(gene, name=f"{stage}.{gene.name}", stage=stage)
