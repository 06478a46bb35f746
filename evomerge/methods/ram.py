"""Reinforced Agent Merging (RAM, RAM+), for the sparse task vectors of RL-trained agents.

With task vectors tau_i = theta_i - theta_base, an element counts as updated by model i when
|tau_i| > epsilon, and c counts the models that update it. Averaging all M task vectors would
dilute an update only one model made, so RAM averages only over the models that made it:

    RAM:   theta = theta_base + sum_i m_i tau_i / max(c, 1),    m_i = [|tau_i| > epsilon].

RAM+ (tensor-local, as in mergekit: the counts are taken per tensor) also scales each model's
unique updates (c = 1) up by how much of what it changed it shares with others:

    rho_i = shared_i / max(unique_i, epsilon),    lambda_i = 1 + r clamp(rho_i, 0, alpha),
    RAM+:  theta = theta_base + sum_i m_i tau_i (lambda_i if c = 1 else 1 / c),

shared_i and unique_i counting model i's updated elements with c > 1 and c = 1. lambda_i is
float32, so (as in mergekit 0.1.5) RAM+ sums 16-bit inputs in float32; evomerge rounds the
result to the merge dtype, where mergekit 0.1.5 writes it in float32 unless out_dtype says
otherwise.
"""

from __future__ import annotations

import math

import torch

from evomerge.methods.registry import MergeInputs, MergeMethod, Param, register


def updates(inputs: MergeInputs, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m_i tau_i, m_i, c): the kept task vectors and masks (M, N), and the counts (1, N)."""
    count = len(inputs.models)
    tau = torch.stack([inputs.delta(i) for i in range(count)]).view(count, -1)  # (M, N)
    updated = tau.abs() > epsilon
    counts = updated.sum(dim=0, keepdim=True)  # int64
    return tau * updated, updated, counts


def ram(inputs: MergeInputs, *, epsilon: float) -> torch.Tensor:
    kept, _, counts = updates(inputs, epsilon)
    merged = (kept / counts.clamp(min=1)).sum(dim=0)  # the merge dtype, like mergekit
    return inputs.base + merged.view_as(inputs.base)


def ramplus_tl(inputs: MergeInputs, *, r: float, alpha: float, epsilon: float) -> torch.Tensor:
    kept, updated, counts = updates(inputs, epsilon)
    unique = counts == 1  # (1, N)
    shared_i = (updated & (counts > 1)).sum(dim=1)  # (M,)
    unique_i = (updated & unique).sum(dim=1)
    rho = shared_i / unique_i.clamp(min=epsilon)  # float32
    lambda_ = 1 + r * rho.clamp(min=0, max=alpha)
    # lambda_i scales only where model i is the one updater, so a model with no unique
    # updates never uses its rho (0/0 when epsilon = 0; mergekit 0.1.5 then gives NaN).
    only_i = updated & unique
    scaled = torch.where(only_i, kept * lambda_.unsqueeze(-1), kept / counts.clamp(min=1))
    merged = scaled.sum(dim=0)  # float32 for 16-bit inputs
    return (inputs.base + merged.view_as(inputs.base)).to(inputs.base.dtype)


EPSILON = Param(
    "epsilon", per_model=False, default=1e-5, bounds=(0.0, 1e-3), limits=(0.0, math.inf)
)
REFERENCE = "https://arxiv.org/abs/2601.13572"

register(
    MergeMethod(name="ram", merge=ram, params=(EPSILON,), base_role="required", reference=REFERENCE)
)
register(
    MergeMethod(
        name="ramplus_tl",
        merge=ramplus_tl,
        params=(
            Param("r", per_model=False, default=0.1, bounds=(0.0, 1.0), limits=(0.0, math.inf)),
            Param("alpha", per_model=False, default=0.2, bounds=(0.0, 1.0), limits=(0.0, math.inf)),
            EPSILON,
        ),
        base_role="required",
        reference=REFERENCE,
    )
)
