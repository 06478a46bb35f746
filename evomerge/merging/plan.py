"""From a recipe to a list of tensor jobs: what each output tensor is made of.

Planning opens every input checkpoint (headers only), lays out output layers slice by slice,
and resolves each parameter for each (tensor, model) with mergekit's precedence: per-source,
then per-slice, then global, with gradients interpolated over the layers of a slice. The
result is plain data; `evomerge.merging.executor` executes it.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from evomerge.errors import UserError
from evomerge.io.adapters import open_checkpoint
from evomerge.io.checkpoint import Checkpoint, check_compatible, layer_index, with_layer_index
from evomerge.io.dtypes import ITEMSIZE
from evomerge.io.statistics import InputStatistics
from evomerge.merging.recipe import Parameters, Recipe, Slice, SliceSource, resolve_setting
from evomerge.merging.tokenizer import VocabularyAlignment, is_vocabulary_tensor
from evomerge.methods import MergeMethod, get_method

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorRef:
    model: str
    name: str


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: its inputs (base apart) and the keyword arguments of the method."""

    out_name: str
    inputs: tuple[TensorRef, ...]
    base: TensorRef | None
    kwargs: dict[str, Any] = field(hash=False)


@dataclass
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    checkpoints: dict[str, Checkpoint]
    jobs: list[TensorJob]
    config_source: str  # the model whose config.json / tokenizer the output starts from
    num_layers: int
    # the output vocabulary and each input's rows, where the recipe aligns vocabularies
    vocabulary: VocabularyAlignment | None = None
    # each model's input statistics, for a method that reads them (RegMean)
    statistics: InputStatistics | None = None

    def grams(self, job: TensorJob) -> Callable[[], list[torch.Tensor | None]] | None:
        """A reader of each input model's statistics for `job` (None for a model without
        them), their shapes checked now from the files' headers; None where the method reads
        no statistics. The reader reads them when called: a search that keeps its inputs
        keeps what the method derives, not the statistics."""
        if self.statistics is None:
            return None
        stats = self.statistics
        present = [  # each file is over the model's own rows
            stats.check(ref.model, ref.name, self.checkpoints[ref.model].shape(ref.name))
            for ref in job.inputs
        ]
        refs = list(job.inputs)

        def read() -> list[torch.Tensor | None]:
            grams = [
                stats.gram(r.model, r.name) if here else None for r, here in zip(refs, present)
            ]
            if self.is_aligned(job.out_name) and all(g is not None and g.dim() == 1 for g in grams):
                # per-row statistics re-laid out by token as the rows are; a head's Gram
                # matrices are over its input (the hidden state) and hold as they are
                return self.vocabulary.align_statistics([r.model for r in refs], grams)
            return grams

        return read

    def is_aligned(self, out_name: str) -> bool:
        """True for a tensor whose rows are re-laid out by token before the merge."""
        return self.vocabulary is not None and is_vocabulary_tensor(out_name)

    def layer_sources(self) -> list[int | None]:
        """For each output layer, the layer of its first input tensor (None where no tensor
        of the layer comes from a layer): what a per-layer config entry is copied from."""
        sources: list[int | None] = [None] * self.num_layers
        for job in self.jobs:
            out = layer_index(job.out_name)
            if out is not None and out < self.num_layers and sources[out] is None:
                sources[out] = layer_index(job.inputs[0].name) if job.inputs else None
        return sources

    def input_bytes(self) -> int:
        """Bytes of input tensor data the merge reads: a tensor that several inputs of a job
        share (the base of several `base+adapter` models) is read once (`read_tensors`)."""
        total = 0
        for job in self.jobs:
            refs = job.inputs + ((job.base,) if job.base else ())
            read = set()
            for ref in refs:
                ckpt = self.checkpoints[ref.model]
                if (key := (ckpt.path.resolve(), ref.name)) not in read:
                    read.add(key)
                    total += _numel(ckpt.shape(ref.name)) * _itemsize(ckpt.dtype_name(ref.name))
        return total


def plan_merge(
    recipe: Recipe,
    *,
    checkpoints: dict[str, Checkpoint] | None = None,
    allow_pickle: bool = False,
) -> MergePlan:
    """Lay out the output tensors and resolve every parameter. `checkpoints` may hold models
    opened earlier (the search re-plans each candidate without re-reading headers)."""
    method = get_method(recipe.merge_method)
    opened = checkpoints or {}
    checkpoints = {
        ref: opened.get(ref) or open_checkpoint(ref, allow_pickle=allow_pickle)
        for ref in recipe.model_paths()
    }
    aligned = recipe.vocabulary_source() is not None
    if any(ref not in opened for ref in checkpoints):  # models opened earlier were checked then
        check_compatible(checkpoints, same_vocabulary=not aligned)
    slices = _as_slices(recipe, checkpoints)
    config_source = recipe.base_model or slices[0].sources[0].model
    reference = checkpoints[config_source]
    planner = _Planner(recipe, method, checkpoints)
    planner.aligned = aligned

    first_layer = [n for n in reference.names if layer_index(n) == 0]
    outside = [n for n in reference.names if layer_index(n) is None]
    pre = [n for n in outside if _is_input_side(n)]
    post = [n for n in outside if not _is_input_side(n)]

    for name in pre:
        planner.add(name, [(s.model, name) for s in slices[0].sources], slices[0], t=0.0)
    out_layer = 0
    for slice_ in slices:
        start, end = slice_.sources[0].layer_range
        span = end - start
        for offset in range(span):
            t = offset / (span - 1) if span > 1 else 1.0
            for template in first_layer:
                sources = [
                    (s.model, with_layer_index(template, s.layer_range[0] + offset))
                    for s in slice_.sources
                ]
                planner.add(with_layer_index(template, out_layer), sources, slice_, t=t)
            out_layer += 1
    for name in post:
        planner.add(name, [(s.model, name) for s in slices[-1].sources], slices[-1], t=0.0)
    vocabulary = None
    if aligned:
        from evomerge.merging.tokenizer import build_alignment

        vocabulary = build_alignment(recipe, checkpoints)
    return MergePlan(
        recipe,
        method,
        checkpoints,
        planner.jobs,
        config_source,
        out_layer,
        vocabulary,
        _statistics(recipe, planner.jobs),
    )


def _statistics(recipe: Recipe, jobs: list[TensorJob]) -> InputStatistics | None:
    """The recipe's statistics files, each model it merges having one, none for another."""
    if not recipe.statistics:
        return None
    merged = {ref.model for job in jobs for ref in job.inputs}
    unknown = sorted(set(recipe.statistics) - set(recipe.model_paths()))
    if unknown:
        raise UserError(f"statistics are given for {unknown[0]!r}, which the recipe does not merge")
    missing = sorted(merged - set(recipe.statistics))
    if missing:
        raise UserError(f"the recipe's statistics name no file for model {missing[0]!r}")
    return InputStatistics(recipe.statistics)


def _is_input_side(name: str) -> bool:
    """Embeddings come before the layers; norms and heads after (slices pick parameters so)."""
    return "embed" in name or name.split(".")[-2:-1] in (["wte"], ["wpe"])


def _as_slices(recipe: Recipe, checkpoints: dict[str, Checkpoint]) -> list[Slice]:
    """`models:` is one slice over every layer, with the base appended if not listed."""
    if recipe.slices is not None:
        for i, slice_ in enumerate(recipe.slices):
            for source in slice_.sources:
                layers = checkpoints[source.model].num_layers
                if source.layer_range[1] > layers:
                    raise UserError(
                        f"slices[{i}]: layer_range {list(source.layer_range)} goes beyond "
                        f"{source.model!r}, which has {layers} layers"
                    )
        return list(recipe.slices)
    sources = [
        SliceSource(
            model=m.model, layer_range=(0, checkpoints[m.model].num_layers), parameters=m.parameters
        )
        for m in recipe.models
    ]
    if recipe.base_model and recipe.base_model not in [m.model for m in recipe.models]:
        layers = checkpoints[recipe.base_model].num_layers
        sources.append(SliceSource(model=recipe.base_model, layer_range=(0, layers)))
    lengths = {s.layer_range[1] for s in sources}
    if len(lengths) > 1:
        raise UserError(
            "the models have different numbers of layers "
            f"({', '.join(f'{s.model}: {s.layer_range[1]}' for s in sources)}); "
            "use slices: to say which layers to merge"
        )
    return [Slice(sources=sources)]


class _Planner:
    def __init__(self, recipe: Recipe, method: MergeMethod, checkpoints: dict[str, Checkpoint]):
        self.recipe, self.method, self.checkpoints = recipe, method, checkpoints
        self.jobs: list[TensorJob] = []
        self.aligned = False  # vocabulary tensors may differ in rows: they are aligned by token

    def add(self, out_name: str, sources: list[tuple[str, str]], slice_: Slice, t: float) -> None:
        base_model = slice_.base_model or self.recipe.base_model
        self._check_present(out_name, sources)
        role = self.method.base_role
        if role == "required" and base_model is None:
            raise UserError(f"merge method {self.method.name!r} needs a base_model")
        if role == "input":
            base, others = None, sources
        else:
            base = next((s for s in sources if s[0] == base_model), None)
            others = [s for s in sources if s[0] != base_model]
        self._check_counts(len(others))
        params = {}
        for param in self.method.global_params:
            value = self._resolve(param, out_name, t, [slice_.parameters, self.recipe.parameters])
            params[_kwarg(param.name)] = value
        for param in self.method.per_model_params:
            params[_kwarg(param.name)] = [
                self._resolve(
                    param,
                    name,
                    t,
                    [_source_params(slice_, model), slice_.parameters, self.recipe.parameters],
                    model,
                )
                for model, name in others
            ]
        self.jobs.append(
            TensorJob(
                out_name=out_name,
                inputs=tuple(TensorRef(m, n) for m, n in others),
                base=TensorRef(*base) if base else None,
                kwargs=params,
            )
        )

    def _resolve(self, param, tensor_name: str, t: float, scopes: list, model: str | None = None):
        for scope in scopes:
            if scope and param.name in scope:
                value = resolve_setting(scope[param.name], tensor_name, t)
                if value is not None:
                    where = f"{model}:{tensor_name}" if model else tensor_name
                    return param.coerce(value, where)
        if param.required:
            where = f" of model {model!r}" if model else ""
            raise UserError(
                f"merge method {self.method.name!r} needs parameter {param.name!r}{where} "
                f"(missing for tensor {tensor_name!r})"
            )
        return param.default

    def _check_present(self, out_name: str, sources: list[tuple[str, str]]) -> None:
        shapes = {}
        for model, name in sources:
            ckpt = self.checkpoints[model]
            if name not in ckpt:
                raise UserError(f"model {model!r} has no tensor {name!r} (needed for {out_name!r})")
            shapes[model] = ckpt.shape(name)
            if self.aligned and is_vocabulary_tensor(out_name):
                shapes[model] = shapes[model][1:]
        if len(set(shapes.values())) > 1:
            described = ", ".join(f"{m}: {list(s)}" for m, s in shapes.items())
            raise UserError(f"tensor {out_name!r} has different shapes across models ({described})")

    def _check_counts(self, count: int) -> None:
        method = self.method
        if count < method.min_models or (method.max_models and count > method.max_models):
            wanted = (
                f"exactly {method.min_models}"
                if method.max_models == method.min_models
                else f"at least {method.min_models}"
                + (f" and at most {method.max_models}" if method.max_models else "")
            )
            besides = " besides the base model" if method.base_role != "input" else ""
            raise UserError(
                f"merge method {method.name!r} takes {wanted} model(s){besides}, got {count}"
            )


def _source_params(slice_: Slice, model: str) -> Parameters | None:
    return next((s.parameters for s in slice_.sources if s.model == model), None)


def _kwarg(name: str) -> str:
    return f"{name}_" if keyword.iskeyword(name) else name


def _itemsize(code: str) -> int:
    return ITEMSIZE.get(code, 4)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
