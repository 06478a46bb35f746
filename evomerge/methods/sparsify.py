"""Sparsification of task vectors: which elements of delta = model - base survive.

Every rule here is deterministic given its inputs: magnitude ranks break ties by element index
(a stable sort), random rules draw from a `UniformField`, and the L1 rescale uses an exact,
order-independent sum. So the same recipe gives the same bits on any device or thread count.
Each function returns a 0/1 keep-mask (or the delta itself when nothing is dropped).
"""

from __future__ import annotations

import math

import torch

from evomerge.methods.random_fields import SCALE, UniformField, keep_threshold


def magnitude_ranks(delta: torch.Tensor) -> torch.Tensor:
    """Rank of every element by |delta|, largest first; ties go to the lower index."""
    order = torch.sort(delta.abs().flatten().float(), descending=True, stable=True).indices
    return _positions(order).view(delta.shape)


def ascending_ranks(delta: torch.Tensor) -> torch.Tensor:
    """Rank of every element by |delta|, smallest first; ties go to the lower index."""
    order = torch.sort(delta.abs().flatten().float(), stable=True).indices
    return _positions(order).view(delta.shape)


def _positions(order: torch.Tensor) -> torch.Tensor:
    """Inverse permutation: where each element landed in `order` (int32 when it fits)."""
    dtype = torch.int32 if order.numel() < 2**31 else torch.int64
    ranks = torch.empty(order.shape, dtype=dtype, device=order.device)
    ranks[order] = torch.arange(order.numel(), dtype=dtype, device=order.device)
    return ranks


def magnitude_keep_count(density: float, numel: int) -> int:
    """TIES trimming keeps the k = int(density * n) largest, at least one if density > 0."""
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def magnitude_mask(ranks: torch.Tensor, density: float) -> torch.Tensor:
    """TIES: keep the top `density` fraction of elements by magnitude."""
    return ranks < magnitude_keep_count(density, ranks.numel())


def breadcrumbs_mask(ascending: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the top `gamma` outliers and the smallest, keep `density`."""
    n = ascending.numel()
    keep = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - keep - top)
    return (ascending >= bottom) & (ascending < bottom + keep)


def dare_mask(draws: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: keep each element independently with probability `density`."""
    return draws < keep_threshold(density)


def row_ranks(delta: torch.Tensor) -> torch.Tensor:
    """Rank of every element by |delta| within its row (1-D: one row), smallest first."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    order = torch.sort(rows.abs().float(), dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(rows.shape[1], device=rows.device).expand_as(order))
    return ranks.view(delta.shape)


def della_mask(row_ranks: torch.Tensor, draws: torch.Tensor, density: float, epsilon: float):
    """DELLA (MagPrune): the keep-probability grows with the magnitude rank within each row,
    from density - epsilon (smallest) to density + epsilon (largest)."""
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(
            f"della needs 0 < density - epsilon and density + epsilon < 1 "
            f"(density {density}, epsilon {epsilon})"
        )
    columns = row_ranks.shape[-1] if row_ranks.dim() >= 2 else row_ranks.numel()
    span = max(columns - 1, 1)
    # float64 so the probabilities are the same on every device
    probs = (density - epsilon) + (row_ranks.double() / span) * (2 * epsilon)
    return draws.double() < probs * SCALE


def l1_rescale(delta: torch.Tensor, kept: torch.Tensor, bound: float) -> torch.Tensor:
    """Scale the kept delta so that its L1 norm equals that of the full delta.

    (DARE's "rescale" in mergekit matches L1 norms rather than dividing by the density.)
    `bound` >= max |delta| sizes the exact sums (see MergeInputs.tau_bound).
    """
    shift = fixed_point_shift(delta.numel(), bound)
    before, after = (
        exact_abs_sum(delta, shift) * 2.0**-shift,
        exact_abs_sum(kept, shift) * 2.0**-shift,
    )
    return kept * l1_factor(before, after, kept.dtype)


def l1_factor(before: float, after: float, dtype: torch.dtype) -> torch.Tensor:
    """before / after in `dtype`, or 1 where either norm is (nearly) zero."""
    if before < 1e-7 or after < 1e-7:
        return torch.ones((), dtype=dtype)
    return torch.tensor(before / after, dtype=dtype)


def fixed_point_shift(numel: int, bound: float) -> int:
    """The power of two that scales values up to `bound` into int64 with room to sum `numel`
    of them."""
    if bound == 0 or not math.isfinite(bound):
        return 0
    headroom = 62 - math.ceil(math.log2(numel + 1))
    return headroom - math.frexp(bound)[1]


def exact_abs_sum(x: torch.Tensor, shift: int, chunk: int = 1 << 24) -> int:
    """sum(|x|) * 2**shift as an exact fixed-point integer sum, so the order of addition cannot
    matter.

    Each |x| is scaled by 2**shift (see `fixed_point_shift`, sized by a bound on the full
    task vector) and truncated to int64; the integer sum cannot overflow and is
    the same on every device and thread count.
    """
    flat = x.detach().flatten()
    total = 0
    for start in range(0, flat.numel(), chunk):
        total += int(_fixed_point(flat[start : start + chunk], shift).sum().item())
    return total


def _fixed_point(x: torch.Tensor, shift: int) -> torch.Tensor:
    return (x.abs().double() * (2.0**shift)).floor().to(torch.int64)


def draw_l1_table(
    delta: torch.Tensor, field: UniformField, index: int, shift: int, chunk: int = 1 << 22
) -> torch.Tensor:
    """What a DARE mask keeps of |delta|, for every density at once: entry b (0..SCALE) is
    exact_abs_sum of delta where its draws are below b, i.e. under keep_threshold of density
    b / SCALE. The last entry is the whole sum. Built once per task vector (one pass), it turns
    the L1 norms of DARE's rescale into two lookups per trial."""
    flat = delta.detach().flatten()
    sums = torch.zeros(SCALE + 1, dtype=torch.int64, device=flat.device)
    for start in range(0, flat.numel(), chunk):
        stop = min(start + chunk, flat.numel())
        draw = field.span(index, start, stop, flat.device)
        sums.index_add_(
            0, draw.long() + 1, _fixed_point(flat[start:stop], shift)
        )  # kept from draw + 1 on
    return sums.cumsum(0)
