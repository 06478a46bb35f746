"""NearSwap: take the other model's value where it is already near the base's.

For each element, with a the base and b the other model,

    w = clamp(t / max(|a - b|, 1e-6), 0, 1),    result = w b + (1 - w) a,

so elements closer than t are swapped to b outright, and farther ones move towards b by
t / |a - b|: t is a distance in the weights' own units (the reference recipe uses 1e-4).
Computed in the merge dtype, as mergekit 0.1.5 does.
"""

from __future__ import annotations

import math

import torch

from evomerge.methods.registry import MergeInputs, MergeMethod, Param, register


def nearswap(inputs: MergeInputs, *, t: float) -> torch.Tensor:
    """t = 0 gives the base model; t above every |a - b| gives the other model."""
    a, b = inputs.base, inputs.models[0]  # same shape, the merge dtype
    if t == 0:
        # w = 0 everywhere. torch divides by multiplying with the reciprocal, which overflows
        # float16 for distances under 2**-16, so 0 / d would be 0 * inf = NaN (as in mergekit).
        return a.clone()
    # The search reuses one MergeInputs across trials: only w depends on t.
    distance = inputs.cached("distance", 0, lambda: torch.abs(a - b).clamp(min=1e-6))
    w = (t / distance).clamp(min=0, max=1)
    return w * b + (1 - w) * a


register(
    MergeMethod(
        name="nearswap",
        merge=nearswap,
        params=(Param("t", per_model=False, bounds=(0.0, 1e-3), limits=(0.0, math.inf)),),
        base_role="required",
        min_models=1,
        max_models=1,
        reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    )
)
