"""Arcee Fusion: keep the other model's change only where it matters most.

With a the base and b the other model, each element's importance is its change scaled by how
far the softmax of its row moved (softmax along the last axis, KL divergence per row):

    p = softmax(b) + 1e-8,  q = softmax(a) + 1e-8,  KL = sum_j p_j log(p_j / q_j),
    importance = |b - a| * KL,

and the change is kept where importance reaches the upper outlier fence of its distribution,

    threshold = median + 1.5 (Q3 - Q1),    result = a + (b - a) * [importance >= threshold].

Quartiles are order statistics: element floor(q (n - 1)) of the sorted importances. mergekit
0.1.5 estimates them from a random sample of 10^6 elements (its global RNG) for larger tensors;
evomerge computes them exactly, so the two agree exactly up to 10^6 elements and up to that
sampling error beyond.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evomerge.methods.registry import MergeInputs, MergeMethod, register


def importance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|b - a| * KL(softmax(b) || softmax(a)) per row, in the merge dtype."""
    p = F.softmax(b, dim=-1) + 1e-8
    q = F.softmax(a, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)  # (..., 1)
    return (b - a).abs() * kl


def outlier_threshold(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5 IQR, from the order statistics floor(q (n - 1)) for q = 1/4, 1/2, 3/4."""
    flat = scores.reshape(-1)
    last = flat.numel() - 1
    ranks = (last // 4, last // 2, 3 * last // 4)  # 0-based, as in mergekit's sorted array
    q1, median, q3 = (flat.kthvalue(rank + 1).values for rank in ranks)
    return median + 1.5 * (q3 - q1)


def arcee_fusion(inputs: MergeInputs) -> torch.Tensor:
    a, b = inputs.base, inputs.models[0]
    scores = importance(a, b)
    keep = (scores >= outlier_threshold(scores)).float()
    # The mask is float32, as in mergekit: 16-bit inputs are summed in float32, rounded once.
    return (a + (b - a) * keep).to(a.dtype)


register(
    MergeMethod(
        name="arcee_fusion",
        merge=arcee_fusion,
        params=(),
        base_role="required",
        min_models=1,
        max_models=1,
        reference="https://arcee.ai",
    )
)
