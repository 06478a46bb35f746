"""nearswap, arcee_fusion, ram and ramplus_tl do what their definitions say, on inputs small
enough to work out by hand (their agreement with mergekit 0.1.5 is in test_mergekit_golden.py),
including where evomerge departs from mergekit on purpose: no NaN from nearswap's t = 0 in
float16 or from RAM+'s epsilon = 0, and exact quartiles in arcee_fusion past 10^6 elements."""

from __future__ import annotations

import pytest
import torch

from evomerge.methods import MergeInputs, get_method
from evomerge.methods.arcee_fusion import outlier_threshold


def _merge(name: str, base: torch.Tensor, *models: torch.Tensor, **params) -> torch.Tensor:
    inputs = MergeInputs(
        models=list(models), base=base, tensor_name="model.layers.0.mlp.up_proj.weight"
    )
    with torch.no_grad():
        return get_method(name).merge(inputs, **params)


# --- nearswap ------------------------------------------------------------------------------
def test_nearswap_swaps_near_elements_and_moves_far_ones_by_t_over_distance():
    base = torch.tensor([0.0, 0.0, 0.0, 1.0])
    other = torch.tensor([0.01, -0.03, 0.2, 1.0])
    out = _merge("nearswap", base, other, t=0.05)
    # |a - b| <= t: swapped; 0.2 away: w = 0.05 / 0.2 = 1/4 of the way; equal: unchanged.
    assert torch.allclose(out, torch.tensor([0.01, -0.03, 0.05, 1.0]), rtol=0, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nearswap_t_zero_is_the_base_and_a_large_t_the_other_model(dtype):
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(64, generator=g) * 0.05).to(dtype)
    other = base.clone()
    other[::2] += (torch.randn(32, generator=g) * 0.01).to(dtype)  # half the elements equal
    # In float16, 0 / |a - b| for equal elements is 0 * (1 / 1e-6 = inf) = NaN in torch.
    assert torch.equal(_merge("nearswap", base, other, t=0.0), base)
    assert torch.equal(_merge("nearswap", base, other, t=1.0), other)


# --- ram / ramplus_tl ----------------------------------------------------------------------
BASE = torch.zeros(6)
# Element:           0     1     2     3      4     5
FT_A = torch.tensor([0.4, 0.2, 0.0, 1e-6, 0.0, 0.3])
FT_B = torch.tensor([0.0, 0.6, 0.0, 0.0, -0.5, 0.1])


def test_ram_keeps_a_lone_update_whole_and_averages_only_the_models_that_made_it():
    out = _merge("ram", BASE, FT_A, FT_B, epsilon=1e-5)
    # 0: only A; 1, 5: both, averaged; 2: nobody; 3: below epsilon, dropped; 4: only B.
    assert torch.allclose(out, torch.tensor([0.4, 0.4, 0.0, 0.0, -0.5, 0.2]), rtol=0, atol=1e-7)


def test_ramplus_scales_each_models_lone_updates_by_its_shared_to_unique_ratio():
    out = _merge("ramplus_tl", BASE, FT_A, FT_B, r=0.5, alpha=10.0, epsilon=1e-5)
    # A updates 0 alone and 1, 5 with B: rho_A = 2 / 1, lambda_A = 1 + 0.5 * 2 = 2.
    # B updates 4 alone and 1, 5 with A: the same, lambda_B = 2. Shared ones are averaged.
    assert torch.allclose(out, torch.tensor([0.8, 0.4, 0.0, 0.0, -1.0, 0.2]), rtol=0, atol=1e-7)
    clamped = _merge("ramplus_tl", BASE, FT_A, FT_B, r=0.5, alpha=0.2, epsilon=1e-5)
    assert torch.allclose(
        clamped, torch.tensor([0.44, 0.4, 0.0, 0.0, -0.55, 0.2]), rtol=0, atol=1e-7
    )


def test_ramplus_with_epsilon_zero_and_a_model_that_changed_nothing_stays_finite():
    # The unchanged model has rho = 0 / 0; mergekit 0.1.5 multiplies every element by it.
    out = _merge("ramplus_tl", BASE, FT_A, BASE.clone(), FT_B, r=0.5, alpha=10.0, epsilon=0.0)
    assert bool(torch.isfinite(out).all())
    # With epsilon 0, A's 1e-6 counts: A updates 0, 3 alone, so lambda_A = 1 + 0.5 * 2 / 2.
    assert torch.allclose(out, torch.tensor([0.6, 0.4, 0.0, 1.5e-6, -1.0, 0.2]), rtol=0, atol=1e-7)


# --- arcee_fusion --------------------------------------------------------------------------
def test_arcee_fusion_keeps_the_change_only_where_its_importance_is_an_outlier():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(16, 32, generator=g) * 0.05
    other = base + torch.randn(16, 32, generator=g) * 0.01
    other[3, 7] += 0.5  # one large change: an outlier of |b - a| * KL
    out = _merge("arcee_fusion", base, other)
    kept = out == base + (other - base)
    assert bool((kept | (out == base)).all())  # each element: the change whole, or none of it
    assert bool(kept[3, 7]) and 0 < int(kept.sum()) < kept.numel() // 4


def test_arcee_fusion_quartiles_are_exact_order_statistics_past_a_million_elements():
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(1_200_001, generator=g)  # mergekit would sample 10^6 of these
    ordered = torch.sort(scores).values
    n = scores.numel()
    q1, median, q3 = ordered[(n - 1) // 4], ordered[(n - 1) // 2], ordered[3 * (n - 1) // 4]
    assert outlier_threshold(scores).item() == (median + 1.5 * (q3 - q1)).item()
