"""The Triton kernel (CUDA GPUs) against the C kernel, bit for bit.

Run by tests/test_kernel_triton.py in a pytest of its own, the one process of the suite that imports
Triton (see tests/conftest.py); not named test_*.py, so the suite does not collect it. On a CUDA GPU
it runs there (the inputs are copied to the GPU, the results compared on the CPU); without one it
runs in Triton's CPU interpreter (TRITON_INTERPRET=1, which tests/test_kernel_triton.py sets), which
executes the same kernel code with numpy: the integer rounding, the hash, the order of every float
operation and the exact L1 sums are what is checked here, and the finiteness each merge reports. On
a GPU, task_vectors.gpu_ready repeats a check like this against the CPU before the kernel is used.
"""

import itertools

import pytest
import torch

pytest.importorskip("triton")

from evomerge.kernel import cpu, triton_merge
from evomerge.kernel.rules import KeepRule, TaskVector
from evomerge.methods.random_fields import UniformField, keep_threshold
from evomerge.methods.sparsify import magnitude_ranks

pytestmark = pytest.mark.skipif(cpu.library() is None, reason="the C kernel is the reference here")

NUMEL = 2 * 1024 + 77  # three kernel blocks, the last one ragged
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_device(base, taus, rules):
    """The kernel's inputs where the Triton kernel runs (the C kernel keeps the CPU copies)."""

    def move(x):
        return None if x is None else x.to(DEVICE)

    rules = [
        KeepRule.key_below(move(r.tensor), r.threshold) if r.mode == KeepRule.KEY_BELOW else r
        for r in rules
    ]
    return move(base), [TaskVector(move(t.x), move(t.base)) for t in taus], rules


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32 if x.dtype == torch.float32 else torch.int16)


def inputs(dtype, mode, subtract):
    generator = torch.Generator().manual_seed(len(mode))
    base = torch.randn(NUMEL, generator=generator).to(dtype)
    models = [
        (base.float() + torch.randn(NUMEL, generator=generator) * 0.02).to(dtype) for _ in range(3)
    ]
    for x in (base, *models):
        x[:5] = -0.0  # a base of -0 with nothing added: sums of -0s are +0, as torch's are
    deltas = [m - base for m in models]
    taus = [TaskVector(m, base) if subtract else TaskVector(d) for m, d in zip(models, deltas)]
    field = UniformField(3, "w")
    if mode == "all":
        rules = [KeepRule.keep_all()] * 3
    elif mode == "ranks":
        rules = [
            KeepRule.key_below(magnitude_ranks(d), NUMEL // (i + 2)) for i, d in enumerate(deltas)
        ]
    else:  # DARE draws, one model keeping everything
        rules = [
            KeepRule.hash_below(field.hash_key(i), keep_threshold(p))
            for i, p in enumerate((0.3, 0.6, 1.0))
        ]
    return base, taus, rules


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["all", "ranks", "draws"])
@pytest.mark.parametrize("subtract", [False, True])
def test_triton_kernel_matches_the_c_kernel(dtype, mode, subtract):
    base, taus, rules = inputs(dtype, mode, subtract)
    scales = [2.0**40] * 3
    on_base, on_taus, on_rules = on_device(base, taus, rules)
    assert triton_merge.abs_sums(on_taus, on_rules, scales) == cpu.abs_sums(taus, rules, scales)[0]
    rescale = torch.tensor([1.0, 1.3, 0.9]).to(dtype)
    signs = ([1, -1, 1], [-1, -1, -1])  # the second: every weighted zero a -0
    for sign, consensus, normalize, lambda_ in itertools.product(
        signs, [False, True], [False, True], [1.0, 0.7]
    ):
        weights = (torch.tensor([0.5, 0.3, 0.8]) * torch.tensor(sign)).to(dtype)
        options = dict(
            consensus=consensus,
            normalize=normalize,
            plain_divisor=float(weights.float().sum()),
            lambda_=lambda_,
        )
        expected, _ = cpu.tv_merge(
            base, taus, rules, rescale, weights, **options, out=torch.empty_like(base)
        )
        got, finite = triton_merge.tv_merge(
            on_base, on_taus, on_rules, rescale, weights, **options, out=torch.empty_like(on_base)
        )
        assert torch.equal(bits(got.cpu()), bits(expected)), (sign, consensus, normalize, lambda_)
        assert finite


@pytest.mark.filterwarnings(
    "ignore:overflow encountered:RuntimeWarning"
)  # numpy, on the way to Inf
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_rounding_covers_every_finite_value(dtype):
    """Products of every finite value with weights that round, overflow and go subnormal."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    every = every[torch.isfinite(every)].contiguous()
    base = torch.zeros_like(every)
    taus = [TaskVector(every), TaskVector(every.flip(0).contiguous())]
    rules = [KeepRule.keep_all()] * 2
    on_base, on_taus, _ = on_device(base, taus, rules)
    flags = []
    for weight in ([0.7, 0.3], [3.0, -2.5], [1e-3, 0.55]):
        w = torch.tensor(weight).to(dtype)
        options = dict(consensus=False, normalize=False, plain_divisor=1.0, lambda_=0.9)
        expected, expected_finite = cpu.tv_merge(
            base, taus, rules, torch.ones(2, dtype=dtype), w, **options
        )
        got, got_finite = triton_merge.tv_merge(
            on_base,
            on_taus,
            rules,
            torch.ones(2, dtype=dtype),
            w,
            **options,
            out=torch.empty_like(on_base),
        )
        got = got.cpu()
        finite = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(got), finite)
        assert torch.equal(bits(got)[finite], bits(expected)[finite]), weight
        assert got_finite == expected_finite == bool(finite.all())
        flags.append(got_finite)
    assert flags == [True, False, True]  # 3.0 and -2.5 overflow the largest values


def test_triton_draws_cross_hash_chunks(monkeypatch):
    """Elements past 2**22 hash with their chunk's key, as random_fields draws them."""
    if DEVICE.type == "cpu":
        monkeypatch.setattr(triton_merge, "BLOCK", 1 << 16)  # fewer interpreted programs
    numel = (1 << 22) + 5
    field = UniformField(1, "x")
    rule = KeepRule.hash_below(field.hash_key(0), keep_threshold(0.3))
    expected = int((field.integers(0, torch.Size([numel])) < keep_threshold(0.3)).sum())
    ones = torch.ones(numel, dtype=torch.bfloat16, device=DEVICE)
    assert triton_merge.abs_sums([TaskVector(ones)], [rule], [1.0]) == [(expected, numel)]
