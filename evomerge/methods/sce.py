"""SCE (Select, Calculate, Erase): keep the elements where the task vectors disagree most
(top `select_topk` by variance across models), weight each model by its mean squared task
vector, erase minority signs, and take the weighted mean."""

from __future__ import annotations

import torch

from evomerge.methods.registry import MergeInputs, MergeMethod, Param, register


def _select_by_variance(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    dtype = task_vectors.dtype
    if fraction <= 0:
        return torch.zeros_like(task_vectors[0], dtype=dtype)
    if fraction >= 1:
        return torch.ones_like(task_vectors[0], dtype=dtype)
    variance = torch.var(task_vectors, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * fraction)
    mask = torch.zeros_like(variance, dtype=dtype)
    if k:
        mask.view(-1)[torch.topk(variance.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def _model_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    energy = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)  # (M,)
    total = torch.sum(energy).item()
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def sce(inputs: MergeInputs, *, select_topk: float, int8_mask: bool = False) -> torch.Tensor:
    base = inputs.base
    if not inputs.models:
        return base
    task_vectors = torch.stack([m - base for m in inputs.models])  # (M, *shape)
    if select_topk < 1:
        task_vectors = task_vectors * _select_by_variance(task_vectors, select_topk).unsqueeze(0)
    elected = torch.where(task_vectors.sum(dim=0) >= 0, 1.0, -1.0).to(base.dtype)
    agree = (task_vectors.sign().to(base.dtype) == elected).to(base.dtype)
    weights = _model_weights(task_vectors).view(-1, *([1] * (task_vectors.dim() - 1)))
    kept = weights * agree
    merged = (task_vectors * kept).sum(dim=0) / torch.sum(kept, dim=0).clamp(min=1e-6)
    return base + merged


register(
    MergeMethod(
        name="sce",
        merge=sce,
        params=(
            Param(
                "select_topk", per_model=False, default=1.0, bounds=(0.0, 1.0), limits=(0.0, 1.0)
            ),
            Param("int8_mask", per_model=False, default=False, kind=bool),
        ),
        base_role="required",
        reference="https://arxiv.org/abs/2408.07990",
    )
)
