"""The task-vector family: task arithmetic, TIES, DARE, Model Breadcrumbs, DELLA.

With task vectors tau_i = theta_i - theta_base, every member computes

    theta = theta_base + lambda * sum_i(w_i * m_i * s_i * tau_i) / Z

where s_i is a sparsification mask (none, magnitude top-k, random, breadcrumbs, della),
m_i a sign-consensus mask (TIES: model i contributes only where the sign of w_i * tau_i equals
the sign of sum_j w_j * tau_j), and Z the normaliser (sum of contributing weights, or 1).
One function, configured eight ways, like the papers describe one idea eight ways.
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import Literal, Optional

import torch

from evomerge.methods import sparsify
from evomerge.methods.registry import MergeInputs, MergeMethod, Param, register
from evomerge.random_fields import UniformField

Sparsifier = Optional[Literal["magnitude", "random", "breadcrumbs", "della"]]


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
    gamma: Optional[list[float]] = None,
    epsilon: Optional[list[float]] = None,
    int8_mask: bool = False,  # a mergekit memory option; it does not change the result
) -> torch.Tensor:
    if not inputs.models:
        return inputs.base
    if rule in (None, "magnitude", "random") and _kernel_ready(inputs):
        return _fused(inputs, weight, density, rule=rule, rescale=rescale, consensus=consensus,
                      normalize=normalize, lambda_=lambda_)  # fmt: skip
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


def _kernel_ready(inputs: MergeInputs) -> bool:
    from evomerge import kernel

    return kernel.applies([inputs.base, *inputs.models])


def _fused(
    inputs: MergeInputs,
    weight: list[float],
    density: list[float],
    *,
    rule: Sparsifier,
    rescale: bool,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """The same merge as `sparsified_delta` + `combine`, in one pass (evomerge/kernel)."""
    from evomerge import kernel

    dtype, models = inputs.base.dtype, len(inputs.models)
    # The search reuses stored task vectors; a one-shot merge subtracts on the fly.
    taus = [
        kernel.TaskVector(inputs.delta(i)) if inputs.reused else kernel.TaskVector(inputs.models[i], inputs.base)
        for i in range(models)
    ]
    rules = [_keep_rule(inputs, i, taus[i], rule, density[i]) for i in range(models)]
    factors = [torch.ones((), dtype=dtype)] * models
    rescaled = [i for i in range(models) if rescale and not rules[i].keeps_all]
    for i, (after, before) in _l1_norms(inputs, taus, rules, rescaled).items():
        factors[i] = sparsify.l1_factor(before, after, dtype)
    w = torch.tensor(weight, dtype=dtype)
    plain_divisor = w.sum()
    if plain_divisor.abs() < 1e-8:
        plain_divisor = torch.ones((), dtype=dtype)
    rescale_factors = torch.stack(factors)
    return kernel.tv_merge(
        inputs.base, taus, rules, rescale_factors, w,
        consensus=consensus, normalize=normalize, plain_divisor=float(plain_divisor), lambda_=lambda_,
        out=_destination(inputs), subnormal_free=_subnormal_free(inputs, rescale_factors, w),
    )  # fmt: skip


# Where no nonzero input to a product, and no nonzero product, falls below this, no value in
# a merge can be subnormal (see _subnormal_free).
NORMAL_FLOOR = 2.0**-99


def _subnormal_free(inputs: MergeInputs, rescale: torch.Tensor, weights: torch.Tensor) -> bool:
    """Whether no value this merge computes can be subnormal, which bfloat16's fast path on
    CPUs with AVX512_BF16 needs (its rounding instruction reads subnormals as zero). Asked only
    where the answer is worth a pass per input: bfloat16 task vectors the search reuses.

    If every nonzero |tau_i| * min(1, s_i) * min(1, |w_i|) (w_i not 0) and every nonzero
    |theta_base| is at least 2^-99, every weighted term is 0 or at least 2^-100 in magnitude (the
    roundings on the way cost less than a factor 2), so a multiple of 2^-107 as a bfloat16
    number; so is every sum of such terms, and the base plus one: none of them is nonzero below
    2^-107, far from the subnormals (below 2^-126)."""
    if not (inputs.reused and inputs.base.dtype == torch.bfloat16 and inputs.base.device.type == "cpu"):
        return False
    if inputs.min_magnitude(len(inputs.models)) < NORMAL_FLOOR:
        return False
    for i, (scale, weight) in enumerate(zip(rescale.float().tolist(), weights.float().tolist())):
        if weight != 0 and inputs.min_magnitude(i) * min(1.0, abs(scale)) * min(1.0, abs(weight)) < NORMAL_FLOOR:
            return False
    return True


# Tensors at least this large keep a draw table for DARE's rescale in the search (512 KiB
# per task vector: at most half a byte per element); smaller ones sum in a pass per trial.
DRAW_TABLE_MIN = 1 << 20


def _l1_norms(inputs: MergeInputs, taus: list, rules: list, rescaled: list[int]) -> dict[int, tuple[float, float]]:
    """{i: (kept, all)}: the L1 norms of task vector i over what rules[i] keeps and over every
    element, from exact fixed-point sums as sparsify.l1_rescale computes them. DARE masks of a
    task vector the search reuses read them from its draw table; the rest take one pass over
    all of them together, whose DARE rules then become the stored bits of what they kept
    (rules is updated)."""
    from evomerge import kernel

    shifts = {i: inputs.l1_shift(i) for i in rescaled}
    sums = {}
    for i in rescaled:
        if inputs.reused and rules[i].mode == kernel.KeepRule.HASH_BELOW and inputs.base.numel() >= DRAW_TABLE_MIN:
            table = inputs.draw_l1_table(i)
            sums[i] = int(table[rules[i].threshold]), int(table[-1])
    scanned = [i for i in rescaled if i not in sums]
    if scanned:
        scales = [2.0 ** shifts[i] for i in scanned]
        found, after = kernel.abs_sums([taus[i] for i in scanned], [rules[i] for i in scanned], scales)
        for i, pair, rule in zip(scanned, found, after):
            sums[i], rules[i] = pair, rule
    return {i: (kept * 2.0 ** -shifts[i], every * 2.0 ** -shifts[i]) for i, (kept, every) in sums.items()}


def kernel_self_check(device: torch.device, dtype: torch.dtype) -> str:
    """'' when the fused kernel on `device` gives the CPU's bits on small random inputs, else
    the merge that differed: DARE-TIES with its L1 rescale and TIES with normalisation (both
    with the base subtracted on the fly and with stored task vectors and ranks), and task
    arithmetic with lambda (see kernel.gpu_ready)."""
    generator = torch.Generator().manual_seed(0)
    numel = 3 * 1024 + 17  # a few kernel blocks and a ragged end
    base = torch.randn(numel, generator=generator).to(dtype)
    models = [(base.float() + 0.02 * torch.randn(numel, generator=generator)).to(dtype) for _ in range(3)]
    for x in (base, *models):
        x[:8] = -0.0  # with all weights negative, sums of -0s: +0, as torch sums
    cases = {
        "dare_ties": dict(rule="random", density=[0.3, 0.5, 1.0], rescale=True, consensus=True, normalize=False, lambda_=1.0),
        "ties": dict(rule="magnitude", density=[0.2, 0.5, 0.7], rescale=False, consensus=True, normalize=True, lambda_=1.0),
        "task_arithmetic": dict(rule=None, density=[1.0] * 3, rescale=False, consensus=False, normalize=False, lambda_=0.8),
    }  # fmt: skip
    weights = ([0.6, -0.3, 0.9], [-0.6, -0.3, -0.9])
    for (name, options), reused, weight in itertools.product(cases.items(), (False, True), weights):
        field = UniformField(7, name)
        expected = task_vector_merge(MergeInputs(models, base, name, field), weight=weight, **options)
        inputs = MergeInputs([m.to(device) for m in models], base.to(device), name, field)
        inputs.reused = reused
        got = _fused(inputs, weight, **options).cpu()
        bits = torch.int16 if got.itemsize == 2 else torch.int32
        if not torch.equal(got.view(bits), expected.view(bits)):
            return f"{name}, {'stored task vectors' if reused else 'base subtracted on the fly'}, weights {weight}"
    return ""


def _destination(inputs: MergeInputs) -> Optional[torch.Tensor]:
    """The caller's output buffer when the kernel can write into it."""
    out, base = inputs.destination, inputs.base
    if out is not None and out.dtype == base.dtype and out.shape == base.shape and out.is_contiguous() and out.device == base.device:
        return out
    return None


def _keep_rule(inputs: MergeInputs, index: int, tau, rule: Sparsifier, density: float):
    """The kernel's form of `sparsified_delta`'s mask: magnitude ranks when the inputs are
    reused across trials (or on a GPU), a radix select otherwise; DARE draws hashed inline."""
    from evomerge.kernel import KeepRule

    if rule is None or density >= 1:
        return KeepRule.keep_all()
    if rule == "random":
        return KeepRule.hash_below(inputs.field.hash_key(index), sparsify.keep_threshold(density))
    k = sparsify.magnitude_keep_count(density, inputs.base.numel())
    if inputs.reused or tau.x.is_cuda:  # the GPU kernel has no radix select
        return KeepRule.key_below(inputs.magnitude_ranks(index), k)
    return KeepRule.top_magnitudes(tau, k)


def _family_member(
    name: str,
    *,
    rule: Sparsifier,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    reference: str,
) -> MergeMethod:
    params = [
        Param("weight", per_model=True, bounds=(0.0, 1.0), role="weight"),
        Param("density", per_model=True, default=1.0, bounds=(0.0, 1.0), limits=(0.0, 1.0), role="density"),
        Param("lambda", per_model=False, default=1.0, bounds=(0.5, 1.5)),
        Param("normalize", per_model=False, default=normalize, kind=bool),
        Param("rescale", per_model=False, default=rescale, kind=bool),
        Param("int8_mask", per_model=False, default=False, kind=bool),
    ]
    if rule == "breadcrumbs":
        params.append(Param("gamma", per_model=True, default=0.01, bounds=(0.0, 0.1), limits=(0.0, 1.0)))
    if rule == "della":
        params.append(Param("epsilon", per_model=True, default=0.15, bounds=(0.0, 0.3), limits=(0.0, 1.0)))
    return MergeMethod(
        name=name,
        merge=partial(task_vector_merge, rule=rule, consensus=consensus),
        params=tuple(params),
        base_role="required",
        randomized=rule in ("random", "della"),
        reference=reference,
    )


TIES_PAPER = "https://arxiv.org/abs/2306.01708"
DARE_PAPER = "https://arxiv.org/abs/2311.03099"
BREADCRUMBS_PAPER = "https://arxiv.org/abs/2312.06795"
DELLA_PAPER = "https://arxiv.org/abs/2406.11617"

for _name, _rule, _consensus, _normalize, _rescale, _ref in (
    ("task_arithmetic", None, False, False, False, "https://arxiv.org/abs/2212.04089"),
    ("ties", "magnitude", True, True, False, TIES_PAPER),
    ("dare_linear", "random", False, False, True, DARE_PAPER),
    ("dare_ties", "random", True, False, True, DARE_PAPER),
    ("breadcrumbs", "breadcrumbs", False, False, False, BREADCRUMBS_PAPER),
    ("breadcrumbs_ties", "breadcrumbs", True, False, False, BREADCRUMBS_PAPER),
    ("della", "della", True, True, True, DELLA_PAPER),
    ("della_linear", "della", False, False, True, DELLA_PAPER),
):
    register(
        _family_member(
            _name,
            rule=_rule,
            consensus=_consensus,
            normalize=_normalize,
            rescale=_rescale,
            reference=_ref,
        )
    )
