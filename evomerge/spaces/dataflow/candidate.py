"""Data-flow candidates, assembled by reference: a trial copies no weights.

Set-up (once per run): every source model is loaded onto the device once; the live evaluation
model is the base. Per trial: the live model's decoder layer list is rebuilt from references to
the sources' resident layers, in the path's order. Each step is a shallow copy of its layer (the
module objects are new, the parameter tensors are the source's), so that the same layer can sit
at two depths with two KV-cache slots (`layer_idx` renumbered). Only a scaled step allocates:
its two output projections times the scale, as mergekit's passthrough computes them.

Embeddings come from the path's first source and the final norm and head from its last, the
rule of mergekit's passthrough slices, so the exported recipe merges to exactly this model.
Where the pool's vocabularies are aligned, each source's embedding and head are re-laid out
once, at set-up, by `evomerge merge`'s own plan and executor (`aligned_ends`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from evomerge.errors import UserError
from evomerge.io.checkpoint import Checkpoint, check_compatible
from evomerge.spaces.dataflow.space import OUTPUT_PROJECTIONS, DataflowSpace, Step

if TYPE_CHECKING:
    import torch


class DataflowCandidate:
    """Writes data-flow candidates into `model` (a Llama-style causal LM: `model.model.layers`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        space: DataflowSpace,
        *,
        dtype: torch.dtype,
        device: str = "cpu",
    ):
        from transformers import AutoModelForCausalLM

        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
            raise UserError(
                f"data-flow search needs a decoder laid out like Llama (model.layers, lm_head); "
                f"{type(model).__name__} is not"
            )
        self.model, self.space = model, space
        self.sources = {}
        for name, path in space.sources.items():
            if name == "base":
                source = _detached_copy(model)  # the live model's own modules are rebuilt per trial
            else:
                source = AutoModelForCausalLM.from_pretrained(
                    path, dtype=dtype, use_safetensors=True, trust_remote_code=False
                )
                source.to(device).eval()
            self.sources[name] = source
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))
        if space.aligned:  # each source's ends in the output vocabulary (the live model's)
            for name, source in self.sources.items():
                _take_ends(source, aligned_ends(space, name, device=device), tied=self.tied)
        else:  # the layers' embeddings and heads are taken as they are: one vocabulary
            paths = {"base": space.base, **space.sources}
            check_compatible({name: Checkpoint(path) for name, path in paths.items()})

    def apply(self, genome: dict[str, float]) -> None:
        self.assemble(self.space.path(genome))

    def assemble(self, path: list[Step]) -> None:
        """Point the live model at the path's layers (and its ends' embeddings, norm and head)."""
        import torch

        first, last = self.sources[path[0].source], self.sources[path[-1].source]
        inner = self.model.model
        inner.embed_tokens = first.model.embed_tokens
        inner.norm = last.model.norm
        self.model.lm_head = (first if self.tied else last).lm_head
        with torch.no_grad():
            inner.layers = torch.nn.ModuleList(
                self._step(step, depth) for depth, step in enumerate(path)
            )
        self.model.config.num_hidden_layers = len(path)
        if getattr(self.model.config, "layer_types", None):
            kinds = self.model.config.layer_types
            self.model.config.layer_types = (
                [kinds[0]] * len(path) if len(set(kinds)) == 1 else _refuse_mixed()
            )

    def _step(self, step: Step, depth: int) -> torch.nn.Module:
        layer = _shallow_copy(self.sources[step.source].model.layers[step.layer])
        layer.self_attn = _shallow_copy(layer.self_attn)
        layer.self_attn.layer_idx = depth
        if step.scale != 1.0:
            for parent in (layer.self_attn, _shallow_copy_attr(layer, "mlp")):
                for name in OUTPUT_PROJECTIONS:
                    if hasattr(parent, name):
                        projection = _shallow_copy(getattr(parent, name))
                        projection.weight = type(projection.weight)(
                            projection.weight * step.scale, requires_grad=False
                        )
                        setattr(parent, name, projection)
        return layer


def aligned_ends(space: DataflowSpace, name: str, *, device: str) -> dict[str, torch.Tensor]:
    """Source `name`'s embedding and head (tensor name -> rows in the output vocabulary): what
    `evomerge merge` writes for a path that starts (embedding) or ends (head) with it, by the
    same plan and executor (a passthrough slice's rows are its one source's, re-laid out)."""
    from evomerge.merging.executor import PreparedTensor, load_inputs
    from evomerge.merging.plan import plan_merge

    plan = plan_merge(space.path_recipe([Step(name, 0)]))
    ends = {}
    for job in plan.jobs:
        if plan.is_aligned(job.out_name):
            inputs = load_inputs(plan, job, seed=0, device=device)  # passthrough draws nothing
            ends[job.out_name], _ = PreparedTensor(plan.method, inputs, resident=False).run(
                job.kwargs
            )
    return ends


def _take_ends(source: torch.nn.Module, ends: dict[str, torch.Tensor], *, tied: bool) -> None:
    """Point `source` (a model of the path's sources) at its aligned embedding and head; a tied
    head is the embedding."""
    import torch

    embedding = _shallow_copy_attr(source.model, "embed_tokens")
    embedding.weight = torch.nn.Parameter(ends["model.embed_tokens.weight"], requires_grad=False)
    embedding.num_embeddings = embedding.weight.shape[0]
    head = _shallow_copy_attr(source, "lm_head")
    weight = ends.get("lm_head.weight")
    head.weight = embedding.weight if tied or weight is None else torch.nn.Parameter(weight, False)
    head.out_features = head.weight.shape[0]


def _shallow_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A new module object over the same parameter tensors; its submodules can be swapped
    without touching the original."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    return clone


def _shallow_copy_attr(parent: torch.nn.Module, name: str) -> torch.nn.Module:
    child = _shallow_copy(getattr(parent, name))
    setattr(parent, name, child)
    return child


def _detached_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The base's modules as loaded, kept aside before the live model is rebuilt."""
    keep = _shallow_copy(model)
    keep.model = _shallow_copy(model.model)
    keep.model.layers = model.model.layers
    return keep


def _refuse_mixed():
    raise UserError(
        "data-flow search does not support models that mix attention kinds across layers yet"
    )
