"""The task-vector family: task arithmetic, TIES, DARE, Model Breadcrumbs, DELLA.

With task vectors tau_i = theta_i - theta_base, every member computes

    theta = theta_base + lambda * sum_i(w_i * m_i * s_i * tau_i) / Z

where s_i is a sparsification mask (none, magnitude top-k, random, breadcrumbs, della),
m_i a sign-consensus mask (TIES: model i contributes only where the sign of w_i * tau_i equals
the sign of sum_j w_j * tau_j), and Z the normaliser (sum of contributing weights, or 1).
One function, configured eight ways, like the papers describe one idea eight ways.

This is the reference, in torch ops. For task arithmetic, TIES and DARE the merge executor
runs a fused kernel with the same bits instead where one applies (evomerge/kernel/task_vectors.py).
"""

from __future__ import annotations

from functools import partial

import torch

from evomerge.methods import sparsify
from evomerge.methods.registry import (
    MergeInputs,
    MergeMethod,
    Param,
    Sparsifier,
    TaskVectorRules,
    register,
)


def sparsified_delta(
    inputs: MergeInputs,
    index: int,
    *,
    rule: Sparsifier,
    density: float,
    rescale: bool,
    gamma: float = 0.0,
    epsilon: float = 0.0,
) -> torch.Tensor:
    """tau_i after trimming/dropping (and, with `rescale`, L1-norm matching)."""
    delta = inputs.delta(index)
    if rule is None or density >= 1:
        return delta
    if rule == "magnitude":
        keep = sparsify.magnitude_mask(inputs.magnitude_ranks(index), density)
    elif rule == "breadcrumbs":
        keep = sparsify.breadcrumbs_mask(inputs.ascending_ranks(index), density, gamma)
    elif rule == "random":
        keep = sparsify.dare_mask(inputs.draws(index), density)
    else:
        if density <= 0:
            return torch.zeros_like(delta)
        keep = sparsify.della_mask(inputs.row_ranks(index), inputs.draws(index), density, epsilon)
    kept = delta * keep.to(delta.dtype)
    return sparsify.l1_rescale(delta, kept, inputs.tau_bound(index)) if rescale else kept


def combine(
    base: torch.Tensor,
    deltas: torch.Tensor,  # (M, *shape): sparsified task vectors
    weights: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """Weight, elect signs, sum, normalise and add to the base: the shared second half."""
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device)
    w = w.view(-1, *([1] * (deltas.dim() - 1)))  # (M, 1, ..., 1)
    weighted = deltas * w
    if consensus:
        elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
        agree = (weighted.sign().to(deltas.dtype) == elected).to(deltas.dtype)
        mixed = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return (base + mixed).to(base.dtype)


def task_vector_merge(
    inputs: MergeInputs,
    *,
    weight: list[float],
    density: list[float],
    normalize: bool,
    rescale: bool,
    lambda_: float,
    rule: Sparsifier,
    consensus: bool,
    gamma: list[float] | None = None,
    epsilon: list[float] | None = None,
    int8_mask: bool = False,  # a mergekit memory option; it does not change the result
) -> torch.Tensor:
    if not inputs.models:
        return inputs.base
    deltas = torch.stack(
        [
            sparsified_delta(
                inputs,
                i,
                rule=rule,
                density=density[i],
                rescale=rescale,
                gamma=gamma[i] if gamma else 0.0,
                epsilon=epsilon[i] if epsilon else 0.0,
            )
            for i in range(len(inputs.models))
        ]
    )
    return combine(
        inputs.base, deltas, weight, consensus=consensus, normalize=normalize, lambda_=lambda_
    )


def _family_member(
    name: str,
    *,
    rule: Sparsifier,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    reference: str,
    baselines: dict | None = None,
) -> MergeMethod:
    params = [
        Param("weight", per_model=True, bounds=(0.0, 1.0), role="weight"),
        Param(
            "density",
            per_model=True,
            default=1.0,
            bounds=(0.0, 1.0),
            limits=(0.0, 1.0),
            role="density",
        ),
        Param("lambda", per_model=False, default=1.0, bounds=(0.5, 1.5)),
        Param("normalize", per_model=False, default=normalize, kind=bool),
        Param("rescale", per_model=False, default=rescale, kind=bool),
        Param("int8_mask", per_model=False, default=False, kind=bool),
    ]
    if rule == "breadcrumbs":
        params.append(
            Param("gamma", per_model=True, default=0.01, bounds=(0.0, 0.1), limits=(0.0, 1.0))
        )
    if rule == "della":
        params.append(
            Param("epsilon", per_model=True, default=0.15, bounds=(0.0, 0.3), limits=(0.0, 1.0))
        )
    return MergeMethod(
        name=name,
        merge=partial(task_vector_merge, rule=rule, consensus=consensus),
        params=tuple(params),
        base_role="required",
        randomized=rule in ("random", "della"),
        reference=reference,
        task_vectors=TaskVectorRules(sparsify=rule, consensus=consensus),
        baselines=baselines or {},
    )


TIES_PAPER = "https://arxiv.org/abs/2306.01708"
DARE_PAPER = "https://arxiv.org/abs/2311.03099"
BREADCRUMBS_PAPER = "https://arxiv.org/abs/2312.06795"
DELLA_PAPER = "https://arxiv.org/abs/2406.11617"

# DARE's paper merges at half density with half weights: a search over DARE-TIES starts there.
DARE_TIES_BASELINES = {"dare_ties_0.5": {"weight": 0.5, "density": 0.5, "interpolation": 0.5}}

for _name, _rule, _consensus, _normalize, _rescale, _ref, _baselines in (
    ("task_arithmetic", None, False, False, False, "https://arxiv.org/abs/2212.04089", None),
    ("ties", "magnitude", True, True, False, TIES_PAPER, None),
    ("dare_linear", "random", False, False, True, DARE_PAPER, None),
    ("dare_ties", "random", True, False, True, DARE_PAPER, DARE_TIES_BASELINES),
    ("breadcrumbs", "breadcrumbs", False, False, False, BREADCRUMBS_PAPER, None),
    ("breadcrumbs_ties", "breadcrumbs", True, False, False, BREADCRUMBS_PAPER, None),
    ("della", "della", True, True, True, DELLA_PAPER, None),
    ("della_linear", "della", False, False, True, DELLA_PAPER, None),
):
    register(
        _family_member(
            _name,
            rule=_rule,
            consensus=_consensus,
            normalize=_normalize,
            rescale=_rescale,
            reference=_ref,
            baselines=_baselines,
        )
    )
