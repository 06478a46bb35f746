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
    """The kernel's inputs where the Triton kernel runs (the C kernel keeps the CPU copies);
    a magnitude rule is found again there, by triton_merge.top_magnitudes."""

    def move(x):
        return None if x is None else x.to(DEVICE)

    taus = [TaskVector(move(t.x), move(t.base)) for t in taus]
    rules = [
        triton_merge.top_magnitudes(tau, r.k) if r.mode == KeepRule.MAGNITUDE else r
        for tau, r in zip(taus, rules)
    ]
    return move(base), taus, rules


def top_k(tau: TaskVector, k: int) -> KeepRule:
    """The C kernel's rule keeping the k largest |tau| (k remembered for `on_device`)."""
    rule = cpu.top_magnitudes(tau, k)
    rule.k = k
    return rule


def kept(rule: KeepRule, tau: TaskVector) -> torch.Tensor:
    """The elements a magnitude rule keeps, by torch ops."""
    d = (tau.x if tau.base is None else tau.x - tau.base).float().cpu().flatten()
    a = d.view(torch.int32).long() & 0x7FFFFFFF
    if rule.keeps_all:
        return torch.ones_like(a, dtype=torch.bool)
    index = torch.arange(a.numel())
    return (a > rule.cut_bits) | ((a == rule.cut_bits) & (index < rule.cutoff))


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
    elif mode == "magnitude":
        rules = [top_k(tau, NUMEL // (i + 2)) for i, tau in enumerate(taus)]
    else:  # DARE draws, one model keeping everything
        rules = [
            KeepRule.hash_below(field.hash_key(i), keep_threshold(p))
            for i, p in enumerate((0.3, 0.6, 1.0))
        ]
    return base, taus, rules


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["all", "magnitude", "draws"])
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


def tied(dtype, numel: int, seed: int) -> torch.Tensor:
    """Values full of equal magnitudes: a few levels with either sign, zeros of both signs and,
    for float32, levels that share their high 16 bits (one bucket of the magnitude table)."""
    generator = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, -0.0, 0.5, -0.5, 0.25, 1.0, -1.0, 0.0078125, 3.0])
    if dtype == torch.float32:
        levels = torch.cat(
            [levels, 1.0 + torch.arange(1, 6) * 2.0**-20, -1.0 - levels[5:6] * 2.0**-20]
        )
    pick = torch.randint(0, levels.numel(), (numel,), generator=generator)
    return levels[pick].to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel", [1, 7, 1024, 3 * 1024 + 5])
def test_top_magnitudes_on_the_device_break_ties_as_the_c_kernel(dtype, numel):
    """The cut found on the device keeps the elements the C kernel's radix select and magnitude
    ranks keep (ties to lower indices), from a table or without, stored or subtracted; the
    merges then have the C kernel's bits."""
    base = tied(dtype, numel, 0)
    models = [tied(dtype, numel, 1 + i) for i in range(3)]
    stored = [TaskVector(m - base) for m in models]
    for density in (0.1, 0.5, 0.9):
        k = max(1, int(density * numel))
        for taus in (stored, [TaskVector(m, base) for m in models]):
            rules = [top_k(tau, k) for tau in taus]
            on_base, on_taus, on_rules = on_device(base, taus, rules)
            for tau, rule, on_tau, on_rule in zip(taus, rules, on_taus, on_rules):
                delta = tau.x if tau.base is None else tau.x - tau.base
                expected = magnitude_ranks(delta) < k
                assert torch.equal(kept(rule, tau), expected)  # the C kernel's rule
                assert torch.equal(kept(on_rule, tau), expected), (density, on_rule.cutoff)
                if tau.base is None:
                    table = triton_merge.magnitude_table(on_tau.x)
                    assert torch.equal(table.cpu(), cpu.magnitude_table(tau.x))
                    from_table = triton_merge.top_magnitudes(on_tau, k, table.cpu())
                    assert (from_table.cut_bits, from_table.cutoff) == (
                        on_rule.cut_bits,
                        on_rule.cutoff,
                    )
            weights = torch.tensor([0.5, -0.3, 0.8]).to(dtype)
            options = dict(consensus=True, normalize=True, plain_divisor=1.0, lambda_=1.0)
            scales = [2.0**40] * 3
            assert (
                triton_merge.abs_sums(on_taus, on_rules, scales)
                == (cpu.abs_sums(taus, rules, scales)[0])
            )
            rescale = torch.ones(3, dtype=dtype)
            expected, _ = cpu.tv_merge(base, taus, rules, rescale, weights, **options)
            got, _ = triton_merge.tv_merge(
                on_base, on_taus, on_rules, rescale, weights, **options,
                out=torch.empty_like(on_base),
            )  # fmt: skip
            assert torch.equal(bits(got.cpu()), bits(expected)), density


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tables", [False, True])
def test_the_gpu_path_of_the_fused_tensor_gives_the_torch_bits(monkeypatch, dtype, tables):
    """task_vectors' GPU path (keep rules, L1 sums, merge) through the Triton kernel, checked as
    gpu_ready checks it on a GPU: TIES's cut found per merge, from the kept magnitude tables
    (forced for small tensors) or without; nothing per element kept for it."""
    from evomerge.kernel import task_vectors

    monkeypatch.setattr(task_vectors, "_on_gpu", lambda tensor: True)
    if tables:
        monkeypatch.setattr(task_vectors, "MAGNITUDE_TABLE_MIN", 0)
    found, select = [], triton_merge.top_magnitudes_of

    def recorded(taus, ks, tables):
        found.extend(table is not None for table in tables)
        return select(taus, ks, tables)

    monkeypatch.setattr(triton_merge, "top_magnitudes_of", recorded)
    assert task_vectors.self_check(DEVICE, dtype) == ""
    # TIES's cuts were found here: one-shot merges without a table, resident ones from theirs
    # (without forcing, self_check's large resident case keeps tables, as a search does)
    assert set(found) == {False, True}
