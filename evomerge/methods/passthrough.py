"""Passthrough: copy one input unchanged (optionally scaled); with `slices:` it stacks layers
from different models into a deeper one ("frankenmerge")."""

from __future__ import annotations

import torch

from evomerge.methods.registry import MergeInputs, MergeMethod, Param, register


def passthrough(inputs: MergeInputs, *, scale: list[float | None]) -> torch.Tensor:
    if len(inputs.models) != 1:
        raise ValueError("passthrough takes exactly one input per slice")
    tensor, factor = inputs.models[0], scale[0]
    return tensor if factor is None else tensor * factor


register(
    MergeMethod(
        name="passthrough",
        merge=passthrough,
        params=(Param("scale", per_model=True, default=None),),
        base_role="input",
        max_models=1,
    )
)
