"""The data-flow search space: which layers a token passes through, taken from several models.

As in Sakana's evolutionary merging paper (Akiba et al., 2024), the candidate is a path through
a fixed, repeated order of the sources' layers; each step of that order is kept or skipped:

    order = [(source s, layer i) for repeat in 1..r for i in 0..L-1 for s in sources]
    path  = [step for step in order if gene(step) >= 1/2]          # at most `max_layers` steps

Interleaving by layer index (rather than all of one model, then the next) suits fine-tunes of
one base: a path that keeps one source per index is a layer-wise pick of specialists, and
repeats let a path go deeper than the base. Where the path moves to another source, an optional
scale gene s multiplies that layer's residual contribution (its o_proj and down_proj), which a
mergekit `passthrough` recipe states as a `scale` parameter, so the exported recipe is exactly
the scored model.

Genes are floats in [0, 1] (inclusion, thresholded) and in the scale bounds, so every sampler
applies; CMA-ES and GP see a surface with flat steps, TPE and random search do not mind them.

A pool whose vocabularies differ is aligned to one model's vocabulary (`pool.tokenizer_source:
<a pool model>`): every recipe names it, and a path's embedding and head are its ends' rows
re-laid out by token, as `evomerge merge` re-lays out a passthrough slice's. `union` and `base`
are refused: they are read from the recipe's models, which are the path's and change with the
genome, and the live model holds one vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from evomerge.errors import UserError
from evomerge.io.checkpoint import Checkpoint, check_compatible, reference_parts
from evomerge.merging.multistage import Stage
from evomerge.merging.recipe import ConditionalSetting, Recipe, Slice, SliceSource, ZeroSource
from evomerge.methods import get_method
from evomerge.spaces.base import Gene, suggest_genome

# The config fields that make one model's layer fit another's (the residual stream and heads).
LAYER_SHAPE_KEYS = (
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
)
# The tensors whose product is a layer's contribution to the residual stream.
OUTPUT_PROJECTIONS = ("o_proj", "down_proj")
THRESHOLD = 0.5


class DataflowConfig(BaseModel):
    """A `search_spaces/*.yaml` file with `kind: dataflow`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["dataflow"]
    repeats: int = Field(default=2, ge=1, le=8)
    max_layers: int | None = Field(default=None, ge=1)
    """At most this many layers in a path (default: the base's depth times `repeats`)."""
    scale: tuple[float, float] | None = None
    """Bounds of the scale where the path changes source; none: no scale genes."""
    sources: list[str] | None = None
    """Pool models whose layers the path may take (`base` for the base); default: all of them."""

    @field_validator("scale")
    @classmethod
    def _ordered(cls, value):
        if value is not None and not 0 < value[0] < value[1]:
            raise ValueError("scale bounds must be [low, high] with 0 < low < high")
        return value


@dataclass(frozen=True)
class Step:
    """One layer of a path: layer `layer` of source `source`, its contribution times `scale`."""

    source: str
    layer: int
    scale: float = 1.0


class DataflowSpace:
    """Genes and decoding of data-flow candidates over one pool."""

    kind = "dataflow"

    def __init__(
        self, config: DataflowConfig, *, base: str, models: dict[str, str], dtype: str | None
    ):
        self.config, self.base, self.dtype = config, base, dtype
        pool = {"base": base, **models}
        names = config.sources or list(pool)
        unknown = [n for n in names if n not in pool]
        if unknown:
            raise UserError(
                f"data-flow space: source {unknown[0]!r} is not in the pool "
                f"(it has: {', '.join(pool)})"
            )
        self.sources = {name: pool[name] for name in names}
        self.num_layers = _check_layers_fit(base, self.sources)
        bound = config.repeats * self.num_layers
        self.max_layers = config.max_layers or bound
        if self.max_layers > bound:
            raise UserError(
                f"data-flow space: max_layers {self.max_layers} exceeds the bound "
                f"repeats x base depth = {config.repeats} x {self.num_layers} = {bound}"
            )
        self.order = [
            (f"R{r}.L{i}.{name}", name, i)
            for r in range(config.repeats)
            for i in range(self.num_layers)
            for name in self.sources
        ]
        self.method = get_method("passthrough")  # what the decoded recipes run
        self.title = "data flow"
        self.groups = [
            (f"R{r}.L{i}", i, i + 1) for r in range(config.repeats) for i in range(self.num_layers)
        ]
        self.genes = self._genes()
        self._vocabulary: dict[str, Any] = {}

    @property
    def vocabulary(self) -> dict[str, Any]:
        """The output tokenizer's recipe keys that every recipe carries (`tokenizer_source` or
        `tokenizer`, `chat_template`; the run config's `pool`); {} for the base's own."""
        return self._vocabulary

    @vocabulary.setter
    def vocabulary(self, keys: dict[str, Any]) -> None:
        tokenizer = keys.get("tokenizer")
        source = tokenizer.source if tokenizer is not None else keys.get("tokenizer_source")
        if source in ("union", "base"):
            raise UserError(
                f"a data-flow space aligns vocabularies to one pool model's (`pool."
                f"tokenizer_source: <name>`), not to {source!r}, which is read from the path's "
                "models and so would change with the genome"
            )
        donors = [entry.source for entry in ((tokenizer and tokenizer.tokens) or {}).values()]
        if any(donor is not None and not isinstance(donor, ZeroSource) for donor in donors):
            raise UserError(
                "in a data-flow space pool.tokenizer.tokens may take no model's embedding "
                "(only `source: {kind: zero}`): a token takes it from the path's first model, "
                "which changes with the genome"
            )
        self._vocabulary = dict(keys)

    @property
    def aligned(self) -> bool:
        """Whether the sources' vocabularies are aligned by token (a vocabulary source is set)."""
        return "tokenizer" in self._vocabulary or "tokenizer_source" in self._vocabulary

    def _genes(self) -> list[Gene]:
        genes = []
        for label, name, _ in self.order:
            group = label.rsplit(".", 1)[0]
            genes.append(Gene(f"{label}.use", 0.0, 1.0, group, None, name, "use"))
            if self.config.scale is not None:
                low, high = self.config.scale
                genes.append(Gene(f"{label}.scale", low, high, group, None, name, "scale"))
        return genes

    def suggest(self, trial) -> dict[str, float]:
        """The genome of `trial`, drawn by the study's sampler."""
        return suggest_genome(trial, self.genes)

    # --- decoding ------------------------------------------------------------------------
    def path(self, genome: dict[str, float]) -> list[Step]:
        """The layers a genome keeps, in order; the first `max_layers` of them, at least one."""
        steps: list[Step] = []
        for label, name, layer in self.order:
            if genome[f"{label}.use"] < THRESHOLD:
                continue
            changes = bool(steps) and steps[-1].source != name
            scale = genome[f"{label}.scale"] if self.config.scale is not None and changes else 1.0
            steps.append(Step(name, layer, scale))
            if len(steps) == self.max_layers:
                break
        return steps or [Step(self.order[0][1], 0)]  # an empty path has no slices to export

    def decode(self, genome: dict[str, float]) -> list[Stage]:
        """The merge a genome stands for: one unnamed stage, its `recipe`."""
        return [Stage(None, self.recipe(genome))]

    def recipe(self, genome: dict[str, float]) -> Recipe:
        """A mergekit passthrough recipe of the genome's path (`path_recipe`)."""
        return self.path_recipe(self.path(genome))

    def path_recipe(self, path: list[Step]) -> Recipe:
        """A mergekit passthrough recipe of `path`: runs of consecutive layers of one source
        become one slice, a scaled layer a slice of its own."""
        slices = []
        for run in _runs(path):
            first, last = run[0], run[-1]
            parameters = None
            if first.scale != 1.0:
                parameters = {
                    "scale": [
                        ConditionalSetting(filter=p, value=first.scale) for p in OUTPUT_PROJECTIONS
                    ]
                    + [ConditionalSetting(filter=None, value=1.0)]
                }
            source = SliceSource(
                model=self.sources[first.source], layer_range=(first.layer, last.layer + 1)
            )
            slices.append(Slice(sources=[source], parameters=parameters))
        return Recipe(
            merge_method="passthrough", slices=slices, dtype=self.dtype, **self.vocabulary
        )

    def baselines(self) -> dict[str, dict[str, float]]:
        """The base alone and each specialist alone: one pass over its own layers."""
        out = {}
        for name in self.sources:
            label = "base_path" if name == "base" else f"only_{name}"
            out[label] = {
                gene.name: float(
                    gene.param == "use" and gene.model == name and gene.group.startswith("R0.")
                )
                if gene.param == "use"
                else 1.0
                for gene in self.genes
            }
        return out


def _runs(path: list[Step]) -> list[list[Step]]:
    """Split a path into runs of consecutive, unscaled layers of one source (a scaled layer is
    a run of its own: a slice's scale applies to all of its layers)."""
    runs: list[list[Step]] = []
    for step in path:
        run = runs[-1] if runs else None
        follows = run and step.source == run[-1].source and step.layer == run[-1].layer + 1
        if follows and run[0].scale == 1.0 and step.scale == 1.0:
            run.append(step)
        else:
            runs.append([step])
    return runs


def _check_layers_fit(base: str, sources: dict[str, str]) -> int:
    """The base's depth, after refusing sources whose layers cannot follow each other."""
    adapters = [name for name, path in sources.items() if len(reference_parts(path)) > 1]
    if adapters:
        raise UserError(
            f"data-flow space: source {adapters[0]!r} is a LoRA adapter; data-flow sources must be "
            "model folders (merge the adapter first: `evomerge merge` of a one-model recipe)"
        )
    checkpoints = {
        "base": Checkpoint(base),
        **{name: Checkpoint(path) for name, path in sources.items() if name != "base"},
    }
    # one architecture; one vocabulary unless aligned (`DataflowCandidate` checks which)
    check_compatible(checkpoints, same_vocabulary=False)
    reference = checkpoints["base"].config
    for name, checkpoint in checkpoints.items():
        for key in LAYER_SHAPE_KEYS:
            mine, theirs = reference.get(key), checkpoint.config.get(key)
            if mine != theirs:
                raise UserError(
                    f"data-flow space: the layers of {name!r} do not fit the base's "
                    f"({key} {theirs} vs {mine})"
                )
    return checkpoints["base"].num_layers
