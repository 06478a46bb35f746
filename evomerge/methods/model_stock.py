"""Model Stock: interpolate between the base and the average of the k fine-tunes by
t = k c / (1 + (k - 1) c), c the mean of the cosines between every pair of task vectors (not
the cosine of a mean angle), taken over the whole tensor or, with `filter_wise`, per output row.
Where 1 + (k - 1) c is (nearly) zero there is no finite t, and the base is kept."""

from __future__ import annotations

import torch

from evomerge.methods.registry import MergeInputs, MergeMethod, Param, register


def model_stock(inputs: MergeInputs, *, filter_wise: bool) -> torch.Tensor:
    base, models = inputs.base, inputs.models
    if len(models) < 2:
        raise ValueError("model_stock needs a base model and at least two others")
    shape = base.shape
    if filter_wise:  # one angle per output row
        if base.dim() == 1:
            base, models = base.unsqueeze(0), [m.unsqueeze(0) for m in models]
    else:  # one angle for the whole tensor
        base, models = base.reshape(-1), [m.reshape(-1) for m in models]
    offsets = [m - base for m in models]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(models)
    denominator = 1 + (k - 1) * cos
    # Where the estimate is singular there is no finite interpolation: keep the base.
    singular = denominator.abs() < 1e-6
    t = torch.where(
        singular,
        torch.zeros_like(cos),
        (k * cos) / torch.where(singular, torch.ones_like(denominator), denominator),
    )
    average = sum(models) / k
    return (t * average + (1 - t) * base).reshape(shape)


register(
    MergeMethod(
        name="model_stock",
        merge=model_stock,
        params=(Param("filter_wise", per_model=False, default=False, kind=bool),),
        base_role="required",
        min_models=2,
        reference="https://arxiv.org/abs/2403.19522",
    )
)
