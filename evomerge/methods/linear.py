"""Linear ("model soup"): theta = sum_i w_i theta_i / sum_i w_i, accumulated in float32."""

from __future__ import annotations

import torch

from evomerge.methods.registry import MergeInputs, MergeMethod, Param, register


def linear(inputs: MergeInputs, *, weight: list[float], normalize: bool) -> torch.Tensor:
    if normalize and abs(sum(weight)) < 1e-12:
        raise ValueError(
            "the weights sum to 0, so they cannot be normalised; "
            "change them or set normalize: false"
        )
    first = inputs.models[0]
    if not first.is_floating_point():
        raise TypeError("linear merging needs floating-point tensors")
    acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    w = torch.tensor(weight, dtype=acc_dtype, device=first.device)
    result = torch.zeros_like(first, dtype=acc_dtype)
    for tensor, w_i in zip(inputs.models, w):
        result.addcmul_(tensor, w_i)  # result += w_i * theta_i, in the accumulation dtype
    if normalize:
        result.div_(w.sum())
    return result.to(first.dtype)


register(
    MergeMethod(
        name="linear",
        merge=linear,
        params=(
            Param("weight", per_model=True, bounds=(0.0, 1.0), role="weight"),
            Param("normalize", per_model=False, default=True, kind=bool),
        ),
        base_role="input",
        reference="https://arxiv.org/abs/2203.05482",
    )
)
