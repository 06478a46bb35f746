"""DARE and DELLA: the statistics of their random masks, and bit-for-bit reproducibility.

Masks come from `UniformField`, a counter-based hash of (seed, tensor name, model index,
element index). The statistics are checked against their binomial tolerances (5 sigma, so a
correct implementation fails with probability ~1e-6 per check; every draw is seeded, so the
tests are deterministic anyway). Reproducibility is checked on whole `evomerge merge` outputs:
two runs, and torch thread counts 1 vs 2 in separate processes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evomerge.merging.executor import run_merge
from evomerge.merging.recipe import parse_recipe
from evomerge.methods import MergeInputs, get_method
from evomerge.methods.random_fields import SCALE, UniformField

N = 1 << 20  # elements per statistical draw


def _sigmas(kept: int, n: int, p: float) -> float:
    return abs(kept - n * p) / math.sqrt(n * p * (1 - p))


# --- the field itself ----------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.01, 0.1, 0.3, 0.5, 0.9])
def test_kept_fraction_is_binomial(p):
    mask = UniformField(7, "model.layers.0.mlp.up_proj.weight").bernoulli(0, p, torch.Size([N]))
    assert _sigmas(int(mask.sum()), N, p) < 5


def test_integers_are_uniform_over_16_bits():
    draws = UniformField(3, "t").integers(0, torch.Size([N]))
    assert int(draws.min()) >= 0 and int(draws.max()) < SCALE
    counts = torch.bincount(draws >> 12, minlength=16).double()  # 16 equal-width bins
    expected = N / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50  # chi-squared, 15 degrees of freedom: p < 1e-5 above 50


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_the_two_halves_of_one_hash_are_independent_draws(p):
    """Elements 2k and 2k + 1 share a hash (its low and high halves): kept together with
    probability p * p, and their joint 16 x 16 histogram flat."""
    draws = UniformField(5, "model.layers.3.self_attn.q_proj.weight").integers(1, torch.Size([N]))
    even, odd = draws[0::2], draws[1::2]
    threshold = round(p * SCALE)
    both = int(((even < threshold) & (odd < threshold)).sum())
    assert _sigmas(both, N // 2, (threshold / SCALE) ** 2) < 5
    joint = torch.bincount((even >> 12) * 16 + (odd >> 12), minlength=256).double()
    expected = N / 2 / 256
    chi2 = float(((joint - expected) ** 2 / expected).sum())
    assert chi2 < 360  # 255 degrees of freedom: p < 2e-5 above 360


def test_masks_of_different_models_names_and_seeds_are_independent():
    p, shape = 0.5, torch.Size([N])
    a = UniformField(0, "w").bernoulli(0, p, shape)
    others = [
        UniformField(0, "w").bernoulli(1, p, shape),  # another model
        UniformField(0, "v").bernoulli(0, p, shape),  # another tensor
        UniformField(1, "w").bernoulli(0, p, shape),  # another seed
    ]
    for b in others:
        assert not torch.equal(a, b)
        both = int((a & b).sum())  # independent: P(both kept) = p * p
        assert _sigmas(both, N, p * p) < 5


def test_a_draw_depends_only_on_the_element_index():
    """Chunked generation and the tensor's shape must not change any element's draw."""
    field = UniformField(11, "model.embed_tokens.weight")
    long = field.integers(2, torch.Size([(1 << 22) + 1000]))  # crosses a chunk boundary
    short = field.integers(2, torch.Size([5000]))
    assert torch.equal(long[:5000], short)
    assert torch.equal(field.integers(2, torch.Size([50, 100])).flatten(), short)
    for start, stop in (
        (0, 1),
        (4990, 5000),
        ((1 << 22) - 7, (1 << 22) + 1000),
        (123, (1 << 22) + 1),
    ):
        assert torch.equal(field.span(2, start, stop), long[start:stop]), (start, stop)


def test_keep_probabilities_step_by_a_65536th():
    from evomerge.methods.random_fields import keep_threshold

    assert [keep_threshold(p) for p in (0.0, 1.0, 0.5, 1 / 65536)] == [0, SCALE, SCALE // 2, 1]
    assert keep_threshold(0.3) == math.ceil(0.3 * 65536)  # rounded up to the next step
    assert keep_threshold(-1) == 0 and keep_threshold(2) == SCALE


def test_draw_l1_table_holds_the_exact_l1_sum_of_every_dare_mask():
    from evomerge.methods.random_fields import keep_threshold
    from evomerge.methods.sparsify import draw_l1_table, exact_abs_sum

    generator = torch.Generator().manual_seed(0)
    delta = (torch.randn((1 << 22) + 333, generator=generator) * 0.01).to(
        torch.bfloat16
    )  # two hash chunks
    field, shift = UniformField(5, "w"), 40
    table = draw_l1_table(
        delta, field, 1, shift, chunk=1 << 21
    )  # chunks of the pass != hash chunks
    assert table.shape == (65537,) and int(table[0]) == 0
    assert int(table[-1]) == exact_abs_sum(delta, shift)
    for density in (1 / 65536, 0.1, 0.5, 0.77, 0.999):
        threshold = keep_threshold(density)
        kept = delta * field.bernoulli(1, density, delta.shape)
        assert int(table[threshold]) == exact_abs_sum(kept, shift), density


# --- DARE ----------------------------------------------------------------------------------
def _inputs(deltas: list[torch.Tensor], base: torch.Tensor, seed: int, name="w") -> MergeInputs:
    return MergeInputs(
        models=[base + d for d in deltas],
        base=base,
        tensor_name=name,
        field=UniformField(seed, name),
    )


def _delta(shape, seed, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.01).to(dtype)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.8])
def test_dare_keeps_a_density_fraction(density):
    from evomerge.methods.task_arithmetic import sparsified_delta

    delta = _delta((1024, 1024), seed=0)
    inputs = _inputs([delta], torch.zeros_like(delta), seed=5)
    kept = sparsified_delta(inputs, 0, rule="random", density=density, rescale=False)
    assert _sigmas(int((kept != 0).sum()), delta.numel(), density) < 5


def _l1(x: torch.Tensor) -> float:
    """The exact (correctly rounded) L1 norm, as the test's independent oracle."""
    return math.fsum(x.abs().double().flatten().tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", ["random", "della"])
def test_l1_rescale_restores_the_l1_norm(rule, dtype):
    from evomerge.methods.task_arithmetic import sparsified_delta

    base = torch.zeros(256, 512, dtype=dtype)
    delta = _delta((256, 512), seed=1, dtype=dtype)
    inputs = _inputs([delta], base, seed=3)
    kept = sparsified_delta(inputs, 0, rule=rule, density=0.3, rescale=True, epsilon=0.1)
    unscaled = sparsified_delta(inputs, 0, rule=rule, density=0.3, rescale=False, epsilon=0.1)
    assert kept.dtype == dtype
    assert torch.equal(kept != 0, unscaled != 0)  # rescaling changes values, not the mask
    before, after = _l1(delta), _l1(kept)
    # Equal up to rounding the scaled elements to the dtype (relative error ~ eps / 2 each).
    assert after == pytest.approx(before, rel=torch.finfo(dtype).eps)
    assert _l1(unscaled) < 0.5 * before


def test_dare_linear_is_unbiased_over_seeds():
    """E[dare_linear] over seeds is task arithmetic with no dropping (DARE's premise)."""
    method, reference = get_method("dare_linear"), get_method("task_arithmetic")
    base = _delta((64, 64), seed=9) * 10
    deltas = [_delta((64, 64), seed=s) for s in (10, 11)]
    weights, p, seeds = [0.6, 0.4], 0.3, 300
    common = {"weight": weights, "normalize": False, "lambda_": 1.0, "int8_mask": False}
    undropped = (
        reference.merge(_inputs(deltas, base, 0), **common, density=[1.0, 1.0], rescale=False)
        - base
    )
    total = torch.zeros_like(base, dtype=torch.float64)
    for seed in range(seeds):
        merged = method.merge(_inputs(deltas, base, seed), **common, density=[p, p], rescale=True)
        total += (merged - base).double()
    mean = total / seeds
    # Per element, a rescaled drop has variance ~ delta^2 (1 - p) / p; the average over seeds
    # shrinks it by 1/seeds. Compare the whole tensor's error with its expected size.
    expected_error = math.sqrt((1 - p) / (p * seeds)) * undropped.double().norm()
    error = (mean - undropped.double()).norm()
    assert error < 2 * expected_error


# --- DELLA ---------------------------------------------------------------------------------
def test_della_keeps_density_on_average_and_favours_large_magnitudes():
    from evomerge.methods.task_arithmetic import sparsified_delta

    density, epsilon = 0.4, 0.15
    delta = _delta((512, 2048), seed=4)
    inputs = _inputs([delta], torch.zeros_like(delta), seed=0)
    keep = (
        sparsified_delta(inputs, 0, rule="della", density=density, epsilon=epsilon, rescale=False)
        != 0
    )
    assert _sigmas(int(keep.sum()), delta.numel(), density) < 5
    # Within each row, the top half by magnitude is kept with mean probability
    # density + epsilon / 2, the bottom half with density - epsilon / 2.
    ranks = delta.abs().argsort(dim=1).argsort(dim=1)
    top = keep[ranks >= delta.shape[1] // 2]
    bottom = keep[ranks < delta.shape[1] // 2]
    assert _sigmas(int(top.sum()), top.numel(), density + epsilon / 2) < 5
    assert _sigmas(int(bottom.sum()), bottom.numel(), density - epsilon / 2) < 5


def test_della_refuses_probabilities_outside_0_1():
    from evomerge.methods.task_arithmetic import sparsified_delta

    inputs = _inputs([_delta((4, 4), 0)], torch.zeros(4, 4), seed=0)
    with pytest.raises(ValueError, match="della"):
        sparsified_delta(inputs, 0, rule="della", density=0.9, epsilon=0.15, rescale=False)


# --- whole merges: reproducibility ---------------------------------------------------------
RECIPES = {
    "dare_ties": """
merge_method: dare_ties
base_model: {base}
parameters: {{density: 0.4}}
models:
  - model: {ft0}
    parameters: {{weight: 0.6}}
  - model: {ft1}
    parameters: {{weight: [0.2, 0.8], density: 0.7}}
""",
    "della_linear": """
merge_method: della_linear
base_model: {base}
dtype: float32
out_dtype: bfloat16
models:
  - model: {ft0}
    parameters: {{weight: 0.5, density: 0.5, epsilon: 0.2}}
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.3}}
""",
}

# Large enough (up to 256 x 1024 elements per tensor) that torch splits work over threads.
POOL_CONFIG = {
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}

_SUBPROCESS = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from evomerge.merging.executor import run_merge
from evomerge.merging.recipe import parse_recipe
for text, out, seed in json.loads(sys.argv[2]):
    run_merge(parse_recipe(text), out, seed=seed)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every recipe merged in-process twice (seed 42), once with seed 43, and once in each of
    two subprocesses with 1 and 2 torch threads (one process per thread count, since
    importing evomerge costs seconds). Returns {(recipe, run): output folder}."""
    from helpers.tiny_models import build_tiny_pool

    root = tmp_path_factory.mktemp("masks")
    folders = build_tiny_pool(root, dtype=torch.bfloat16, n_models=2, seed=5, **POOL_CONFIG)
    texts = {name: recipe.format(**folders) for name, recipe in RECIPES.items()}
    out = {}
    for name, text in texts.items():
        for run, seed in (("a", 42), ("b", 42), ("seed43", 43)):
            out[name, run] = run_merge(parse_recipe(text), root / name / run, seed=seed).out_dir
    procs = []
    for threads in (1, 2):  # both at once: their start-up dominates
        jobs = [(text, str(root / name / f"threads{threads}"), 42) for name, text in texts.items()]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _SUBPROCESS, str(threads), json.dumps(jobs)], env=env
            )
        )
        for name in texts:
            out[name, f"threads{threads}"] = root / name / f"threads{threads}"
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    return out


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        h.update(file.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_merge_is_bit_reproducible_across_runs_and_threads(runs, name):
    first = _digest(runs[name, "a"])
    assert _digest(runs[name, "b"]) == first
    assert _digest(runs[name, "threads1"]) == first
    assert _digest(runs[name, "threads2"]) == first


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_another_seed_gives_other_masks(runs, name):
    from safetensors.torch import load_file

    a = load_file(next(runs[name, "a"].glob("*.safetensors")))
    b = load_file(next(runs[name, "seed43"].glob("*.safetensors")))
    differing = [n for n in a if not torch.equal(a[n], b[n])]
    assert len(differing) == len(a)  # every tensor's masks changed, not just some
