"""A refined candidate: a genome plus one weight per model per output tensor.

It is stored in the study as the genome (the trial's params, the black-box trial it started
from) and the per-tensor weights (user attribute `REFINED_ATTR`: output tensor -> one weight per
model, in the order of the tensor's merge inputs, i.e. the pool's order). `apply_refined`
materialises it through the compiled candidate's own jobs and executor; `refined_recipe` writes
it as the genome's recipe with each source's `weight` replaced by a list of `{filter: <tensor
name>, value: w}` entries (mergekit's conditional parameters, first match wins), so that
`evomerge merge` and mergekit-yaml plan every tensor with exactly the weights that were scored,
and the model is the scored one bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from evomerge.errors import CandidateError
from evomerge.io.checkpoint import layer_index
from evomerge.merging.plan import plan_merge
from evomerge.merging.recipe import ConditionalSetting, Recipe

if TYPE_CHECKING:
    from evomerge.spaces.parameters.candidate import CompiledCandidate
    from evomerge.spaces.parameters.space import SearchSpace

"""The user attribute of a refined trial: output tensor name -> per-model weights."""


def apply_refined(
    candidate: CompiledCandidate, genome: dict[str, float], weights: dict[str, list[float]]
) -> None:
    """Materialise `genome` with `weights` replacing each tensor's per-model weights;
    CandidateError where a merged tensor is not finite (as `CompiledCandidate.apply`)."""
    for job in candidate.jobs:
        kwargs = job.parameters(genome)
        kwargs["weight"] = [float(v) for v in weights[job.name]]
        if not job.tensor.run_into(kwargs, job.target):
            raise CandidateError(f"the merged tensor {job.name!r} has NaN or Inf values")


def refined_recipe(
    space: SearchSpace, genome: dict[str, float], weights: dict[str, list[float]]
) -> Recipe:
    """The genome's recipe with per-tensor weights: in each slice, each source's `weight` is
    a `{filter, value}` list over the source tensors that slice plans, then the genome's own
    value for anything else. Checked by planning it: every tensor gets exactly `weights`."""
    recipe = space.recipe(genome)
    plan = plan_merge(recipe)
    per_source: dict[tuple[int, str], list[ConditionalSetting]] = {}
    for job in plan.jobs:
        where = _slice_of(job.out_name, recipe)
        for model_index, ref in enumerate(job.inputs):
            value = float(weights[job.out_name][model_index])
            per_source.setdefault((where, ref.model), []).append(
                ConditionalSetting(filter=ref.name, value=value)
            )
    slices = []
    for i, slice_ in enumerate(recipe.slices):
        sources = []
        for source in slice_.sources:
            entries = per_source.get((i, source.model))
            if entries is not None:
                params = dict(source.parameters or {})
                params["weight"] = [*entries, ConditionalSetting(value=params["weight"])]
                source = source.model_copy(update={"parameters": params})
            sources.append(source)
        slices.append(slice_.model_copy(update={"sources": sources}))
    refined = recipe.model_copy(update={"slices": slices})
    _check_weights(refined, weights, plan)
    return refined


def _slice_of(name: str, recipe: Recipe) -> int:
    """The slice whose parameters the planner reads for output tensor `name`: the one whose
    layers hold it; tensors outside the layers take the first (embeddings) or last slice."""
    layer = layer_index(name)
    if layer is None:
        return 0 if "embed" in name else len(recipe.slices) - 1
    start = 0
    for i, slice_ in enumerate(recipe.slices):
        low, high = slice_.sources[0].layer_range
        if start <= layer < start + high - low:
            return i
        start += high - low
    raise RuntimeError(f"no slice holds {name!r}")


def _check_weights(recipe: Recipe, weights: dict, before) -> None:
    """Plan `recipe` and check that every tensor's weights are `weights` exactly (a filter
    that is a substring of another tensor's name would break that)."""
    plan = plan_merge(recipe, checkpoints=before.checkpoints)
    for job in plan.jobs:
        want = [float(v) for v in weights[job.out_name]]
        if job.kwargs["weight"] != want:
            raise RuntimeError(f"the refined recipe plans other weights for {job.out_name!r}")
