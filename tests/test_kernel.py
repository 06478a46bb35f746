"""The fused CPU kernel equals the torch code of the task-vector family bit for bit."""

from __future__ import annotations

import ctypes
import itertools
import math
import platform
import shutil
import subprocess

import pytest
import torch

from evomerge.kernel import cpu
from evomerge.kernel.task_vectors import DRAW_TABLE_MIN, NORMAL_FLOOR, FusedTensor
from evomerge.methods.random_fields import UniformField
from evomerge.methods.registry import MergeInputs
from evomerge.methods.task_arithmetic import combine, sparsified_delta

pytestmark = pytest.mark.skipif(cpu.library() is None, reason="no C compiler to build the kernel")


def make_inputs(dtype: torch.dtype, models: int = 3, shape=(61, 97), seed: int = 0) -> MergeInputs:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    tensors = []
    for i in range(models):
        delta = torch.randn(shape, generator=generator) * 0.01
        delta[torch.rand(shape, generator=generator) < 0.1] = 0  # exact zeros: sign 0 never votes
        if i == 1:
            delta[:4] = -delta[:4].abs()  # conflicting signs
        tensors.append((base + delta).to(dtype))
        tensors[-1][
            0, :5
        ] = -0.0  # a base of -0 with nothing added: sums of -0 must give +0 (as torch's do)
    base[0, :5] = -0.0
    # bf16 rounding makes many |delta| equal: stable-rank tie-breaking is exercised too
    return MergeInputs(
        models=tensors,
        base=base.to(dtype),
        tensor_name="layers.0.w",
        field=UniformField(7, "layers.0.w"),
    )


def fused(inputs, weight, density, *, resident, rule, consensus, **options) -> torch.Tensor:
    """The kernel's merge; its finiteness flag checked against the result's own values.
    resident: stored task vectors, cached ranks and draw tables (the search); else one-shot."""
    fused_tensor = FusedTensor(inputs, rule=rule, consensus=consensus, resident=resident)
    return fused_tensor_merge(fused_tensor, weight, density, **options)


def fused_tensor_merge(fused_tensor: FusedTensor, weight, density, **options) -> torch.Tensor:
    got, finite = fused_tensor.merge(weight=weight, density=density, **options)
    assert finite == bool(torch.isfinite(got).all())
    return got


def torch_path(inputs, weight, density, *, rule, rescale, consensus, normalize, lambda_):
    deltas = torch.stack(
        [
            sparsified_delta(inputs, i, rule=rule, density=density[i], rescale=rescale)
            for i in range(len(inputs.models))
        ]
    )
    return combine(
        inputs.base, deltas, weight, consensus=consensus, normalize=normalize, lambda_=lambda_
    )


CASES = list(
    itertools.product(
        [False, True],  # resident: inputs kept across trials (the search), or merged once
        [torch.float32, torch.bfloat16, torch.float16],
        [None, "magnitude", "random"],
        [True, False],  # consensus
        [True, False],  # normalize
        [True, False],  # rescale
    )
)


@pytest.mark.parametrize("resident,dtype,rule,consensus,normalize,rescale", CASES)
def test_kernel_matches_torch_ops(resident, dtype, rule, consensus, normalize, rescale):
    check_kernel_matches_torch_ops(resident, dtype, rule, consensus, normalize, rescale)


def check_kernel_matches_torch_ops(resident, dtype, rule, consensus, normalize, rescale):
    # 61 x 97 elements: 23 whole blocks of 256 and a last one of 29 (not a multiple of 8)
    inputs = make_inputs(dtype)
    for weight, density, lambda_ in (
        ([0.3, 0.5, 0.2], [0.5, 0.7, 0.3], 1.0),
        ([1.0, -0.4, 0.7], [1.0, 0.2, 0.9], 0.8),  # a negative weight flips a model's vote
        ([0.0, 0.0, 0.0], [0.5, 0.5, 0.5], 1.0),  # zero weights: the divisor fallbacks
        ([-0.3, -0.5, -0.2], [0.5, 0.7, 0.3], 1.0),  # every weighted zero a -0
        ([0.6, 0.3, 0.1], [0.0, 1e-3, 1.0], 1.3),  # density 0 and a single kept element
    ):
        options = dict(
            rule=rule, rescale=rescale, consensus=consensus, normalize=normalize, lambda_=lambda_
        )
        expected = torch_path(inputs, weight, density, **options)
        got = fused(inputs, weight, density, resident=resident, **options)
        assert got.dtype == expected.dtype
        assert torch.equal(bits(got), bits(expected)), (weight, density)


def test_a_resident_tensor_keeps_task_vectors_not_the_models_too():
    """A model is base + task vector: a search keeps one of the two (n + 2 model-sizes for n
    sources, the live model included, not 2n + 2), and merges the same bits from it."""
    import weakref

    inputs = make_inputs(torch.bfloat16)
    alive = [weakref.ref(model) for model in inputs.models]
    expected = torch_path(
        make_inputs(torch.bfloat16),
        [0.3, 0.5, 0.2],
        [0.5, 0.7, 0.3],
        rule="magnitude",
        rescale=False,
        consensus=True,
        normalize=True,
        lambda_=1.0,
    )
    kept = FusedTensor(inputs, rule="magnitude", consensus=True, resident=True)
    assert inputs.models == [None, None, None]
    assert all(ref() is None for ref in alive), "a source model is still referenced"
    got, _ = kept.merge(
        weight=[0.3, 0.5, 0.2],
        density=[0.5, 0.7, 0.3],
        normalize=True,
        rescale=False,
        lambda_=1.0,
    )
    assert torch.equal(bits(got), bits(expected))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("consensus", [True, False])  # dare_ties, dare_linear
def test_dare_rescale_from_the_draw_table_matches_torch_ops(dtype, consensus):
    """The search's large tensors take DARE's L1 sums from a table built once, not a pass."""
    inputs = make_inputs(dtype, shape=(1024, DRAW_TABLE_MIN // 1024 + 3))
    resident = FusedTensor(inputs, rule="random", consensus=consensus, resident=True)
    for density in ([0.5, 0.7, 0.3], [0.11, 1.0, 0.999], [0.0, 1 / 65536, 0.42]):
        options = dict(rescale=True, normalize=False, lambda_=1.0)
        expected = torch_path(
            inputs, [0.3, 0.5, 0.2], density, rule="random", consensus=consensus, **options
        )
        got = fused_tensor_merge(resident, [0.3, 0.5, 0.2], density, **options)
        assert torch.equal(bits(got), bits(expected)), density
    assert sorted(resident._draw_tables) == [0, 1, 2]  # the table path ran


def test_the_fast_bfloat16_path_is_asked_for_only_where_no_value_can_be_subnormal():
    def ask(
        scale,
        weight,
        *,
        smallest_tau=2.0**-95,
        smallest_base=1.0,
        dtype=torch.bfloat16,
        resident=True,
    ):
        base = torch.ones(64)
        base[3], base[5] = 0.0, smallest_base
        tau = torch.full((64,), 0.5)
        tau[3] = smallest_tau  # where the base is 0, so that base + tau keeps it
        inputs = MergeInputs(models=[(base + tau).to(dtype)], base=base.to(dtype), tensor_name="w")
        fused_tensor = FusedTensor(inputs, rule="random", consensus=True, resident=resident)
        assert (
            fused_tensor.min_magnitude(0) == smallest_tau
            and fused_tensor.min_magnitude(1) == smallest_base
        )
        return fused_tensor.subnormal_free(torch.tensor([scale]), torch.tensor([weight]))

    assert NORMAL_FLOOR == 2.0**-99
    assert ask(1.0, 2.0**-4)  # 2^-95 * 2^-4 = 2^-99, the least it takes
    assert not ask(1.0, 2.0**-5)
    assert not ask(0.5, 2.0**-4)  # a factor below 1 counts too
    assert ask(3.0, -1.0) and ask(1.0, 0.0)  # larger factors and weights; a zero weight adds zeros
    assert not ask(1.0, 1.0, smallest_base=2.0**-100)  # the base plus a term might be subnormal
    assert not ask(1.0, 1.0, dtype=torch.float32)  # float32 has no such path
    assert not ask(
        1.0, 1.0, resident=False
    )  # a plain merge reads each input once: no pass for its smallest magnitudes


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32 if x.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel", [1, 7, 5000, (1 << 22) + 3])  # the last spans two hash chunks
def test_inline_draws_and_magnitude_cut_match_the_torch_definitions(dtype, numel):
    from evomerge.kernel.cpu import abs_sums, top_magnitudes
    from evomerge.kernel.rules import KeepRule, TaskVector
    from evomerge.methods.random_fields import keep_threshold
    from evomerge.methods.sparsify import magnitude_ranks

    generator = torch.Generator().manual_seed(numel)
    delta = (torch.randn(numel, generator=generator) * 0.01).to(dtype)
    field = UniformField(3, "x")
    ones = torch.ones_like(delta)
    for p in (0.0, 0.3, 0.999):
        kept = field.integers(1, delta.shape) < keep_threshold(p)
        rule = KeepRule.hash_below(field.hash_key(1), keep_threshold(p))
        sums, (stored,) = abs_sums([TaskVector(ones)], [rule], [1.0])
        assert sums == [(int(kept.sum()), numel)]
        stored_bits = stored.tensor.long()  # the kept elements as bits, for the merge pass
        unpacked = (stored_bits[torch.arange(numel) // 8] >> (torch.arange(numel) % 8)) & 1
        assert torch.equal(unpacked.bool(), kept)
    ranks = magnitude_ranks(delta)
    base = torch.randn(numel, generator=generator).to(dtype)
    model = (base.float() + delta.float()).to(dtype)
    subtracted = model - base  # what a one-shot merge computes on the fly
    sub_ranks = magnitude_ranks(subtracted)
    for k in sorted({0, 1, numel // 3, numel - 1, numel}):
        expected = int(((ranks < k) * (delta.double().abs() * 2.0**30).floor()).sum())
        assert (
            abs_sums([TaskVector(delta)], [top_magnitudes(TaskVector(delta), k)], [2.0**30])[0][0][
                0
            ]
            == expected
        )
        expected = int(((sub_ranks < k) * (subtracted.double().abs() * 2.0**30).floor()).sum())
        tau = TaskVector(model, base)
        assert abs_sums([tau], [top_magnitudes(tau, k)], [2.0**30])[0][0][0] == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel", [1, 7, 5000, (1 << 22) + 3])
def test_the_cut_from_a_magnitude_table_keeps_the_ranks_top_k(dtype, numel):
    """A resident task vector's magnitude table gives each merge the same top-k as its
    magnitude ranks (ties to lower indices), for every k, heavy ties and zeros included."""
    from evomerge.methods.sparsify import magnitude_ranks

    generator = torch.Generator().manual_seed(numel)
    delta = (torch.randn(numel, generator=generator) * 0.01).to(dtype)
    delta[torch.rand(numel, generator=generator) < 0.2] = 0  # ties at zero
    delta[torch.rand(numel, generator=generator) < 0.1] = -0.005  # ties of both signs
    delta[torch.rand(numel, generator=generator) < 0.1] = 0.005
    table = cpu.magnitude_table(delta)
    assert table.shape == (cpu.MAGNITUDE_TABLE_ENTRIES,) and int(table.sum()) == numel
    check_cut_from_table(delta, table, magnitude_ranks(delta))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_cut_from_a_magnitude_table_over_every_finite_value(dtype):
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    every = every[torch.isfinite(every)]
    shuffled = every[torch.randperm(every.numel(), generator=torch.Generator().manual_seed(0))]
    delta = torch.cat([shuffled, shuffled]).contiguous()  # every magnitude four times over
    from evomerge.methods.sparsify import magnitude_ranks

    check_cut_from_table(delta, cpu.magnitude_table(delta), magnitude_ranks(delta), sums=False)


def check_cut_from_table(delta, table, ranks, *, sums: bool = True):
    from evomerge.kernel.rules import TaskVector

    numel = delta.numel()
    generator = torch.Generator().manual_seed(1)
    ks = {0, 1, 2, numel // 3, numel // 2, numel - 1, numel}
    ks |= set(torch.randint(0, numel + 1, (8,), generator=generator).tolist())
    for k in sorted(ks):
        rule = cpu.top_magnitudes(TaskVector(delta), k, table)
        if sums:
            expected = int(((ranks < k) * (delta.double().abs() * 2.0**30).floor()).sum())
            assert cpu.abs_sums([TaskVector(delta)], [rule], [2.0**30])[0][0][0] == expected, k
        kept_values = kept_by(delta, rule)  # the kept elements themselves, not only their sum
        assert torch.equal(kept_values, torch.where(ranks < k, delta, 0).float()), k


def kept_by(delta: torch.Tensor, rule) -> torch.Tensor:
    """delta where `rule` keeps it, else 0 (as float32): the kernel's merge of delta alone,
    weight 1, over a base of 0."""
    from evomerge.kernel.rules import TaskVector

    one = torch.ones(1, dtype=delta.dtype)
    out, _ = cpu.tv_merge(
        torch.zeros_like(delta), [TaskVector(delta)], [rule], one, one, consensus=False,
        normalize=False, plain_divisor=1.0, lambda_=1.0,
    )  # fmt: skip
    return out.float() + 0.0  # -0 and +0 alike


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "consensus,normalize,rescale", list(itertools.product([True, False], repeat=3))
)
def test_resident_ties_from_magnitude_tables_matches_torch_ops(
    monkeypatch, dtype, consensus, normalize, rescale
):
    """The search's TIES from magnitude tables (forced here on a small tensor) gives the torch
    code's bits."""
    from evomerge.kernel import task_vectors

    monkeypatch.setattr(task_vectors, "MAGNITUDE_TABLE_MIN", 0)
    check_kernel_matches_torch_ops(True, dtype, "magnitude", consensus, normalize, rescale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_resident_ties_tensor_keeps_a_magnitude_table_not_ranks(dtype):
    """TIES in a search keeps, per task vector and tensor, the smaller of int32 magnitude ranks
    (4 bytes an element) and a magnitude table (256 KiB): a large tensor never holds ranks."""
    from evomerge.kernel.task_vectors import MAGNITUDE_TABLE_MIN

    table_bytes = cpu.MAGNITUDE_TABLE_ENTRIES * 8
    assert MAGNITUDE_TABLE_MIN * 4 == table_bytes  # ranks below it are no larger than a table
    weight, density = [0.3, 0.5, 0.2], [0.5, 0.7, 0.3]
    options = dict(normalize=True, rescale=False, lambda_=1.0)
    for shape, tables in (((256, 256), True), ((255, 256), False)):
        inputs = make_inputs(dtype, shape=shape)
        expected = torch_path(
            make_inputs(dtype, shape=shape), weight, density, rule="magnitude", consensus=True,
            **options,
        )  # fmt: skip
        kept = FusedTensor(inputs, rule="magnitude", consensus=True, resident=True)
        for _ in range(2):  # the second merge reads what the first kept
            got = fused_tensor_merge(kept, weight, density, **options)
            assert torch.equal(bits(got), bits(expected))
        ranks = [key for key in inputs._memo if key[0] == "desc"]
        if tables:
            assert ranks == [], "magnitude ranks are kept where a magnitude table should be"
            assert sorted(kept._magnitude_tables) == [0, 1, 2]
            assert all(
                t.numel() * t.element_size() == table_bytes for t in kept._magnitude_tables.values()
            )
        else:
            assert len(ranks) == 3 and not kept._magnitude_tables
            assert all(
                inputs._memo[key].numel() * inputs._memo[key].element_size() < table_bytes
                for key in ranks
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_draw_l1_table_matches_the_torch_definition(dtype):
    from evomerge.methods.sparsify import draw_l1_table

    delta = (torch.randn((1 << 22) + 1001) * 0.01).to(dtype)  # two hash chunks, a ragged block
    field = UniformField(3, "w")
    expected = draw_l1_table(delta, field, 2, 45)
    assert torch.equal(cpu.draw_l1_table(delta, field.hash_key(2), 2.0**45), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_abs_peak_is_the_largest_magnitude_and_sees_every_nan_and_inf(dtype):
    x = torch.randn(300_000).to(dtype)  # above the kernel's threshold for threads
    x[123] = -7.5
    assert cpu.abs_peak(x) == 7.5
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[7777] = bad
        peak = cpu.abs_peak(y)
        assert math.isnan(peak) if math.isnan(bad) else peak == math.inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_min_magnitude_is_the_smallest_nonzero_one(dtype):
    x = torch.zeros((1 << 19) + 3, dtype=dtype)  # several threads' shares
    assert cpu.min_magnitude(x) == math.inf  # nothing nonzero
    smallest = torch.finfo(dtype).smallest_normal / 4  # a subnormal
    x[::1000] = 3.0
    x[77_777] = -smallest
    x[-1] = -0.5
    assert cpu.min_magnitude(x) == smallest
    x[77_777] = 0.0
    assert cpu.min_magnitude(x) == 0.5


def test_kernel_is_the_same_with_any_thread_count():
    inputs = make_inputs(torch.float32, shape=(512, 300))
    options = dict(rule="random", rescale=True, consensus=True, normalize=False, lambda_=1.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused(inputs, [0.4, 0.4, 0.4], [0.5, 0.5, 0.5], resident=False, **options)
        torch.set_num_threads(2)
        two = fused(inputs, [0.4, 0.4, 0.4], [0.5, 0.5, 0.5], resident=False, **options)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_finite_value_converts_and_rounds_like_torch(dtype):
    """Loads, stores and per-op rounding over the whole range of the type: subnormals,
    overflow to Inf, ties to even."""
    check_every_finite_value(dtype)


def check_every_finite_value(dtype):
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    every = every[torch.isfinite(every)][1:]  # [1:]: a last block of 255, not a multiple of 8
    models = [every.clone(), every.flip(0).contiguous()]
    inputs = MergeInputs(
        models=models, base=torch.zeros_like(every), tensor_name="w", field=UniformField(5, "w")
    )
    plain = dict(rule=None, rescale=False, consensus=False, normalize=False)
    for weight, lambda_ in (
        ([1.0, 0.0], 1.0),
        ([0.7, 0.3], 1.0),
        ([0.55, 0.45], 0.9),
        ([3.0, -2.5], 1.0),
    ):
        check_same_finite_bits(inputs, weight, [1.0, 1.0], **plain, lambda_=lambda_, resident=False)
    # dare_ties over stored task vectors large enough for draw tables: the search's hot path,
    # which for bfloat16 on CPUs with AVX512_BF16 takes a path of its own where no value can
    # be subnormal: not so with every value, but so without the magnitudes below 2^-90
    dare_ties = dict(rule="random", rescale=True, consensus=True, normalize=False, lambda_=1.0)
    for values in (every, every[every.float().abs() >= 2.0**-90]):
        copies = DRAW_TABLE_MIN // values.numel() + 1
        models = [
            torch.cat([m.roll(c * 101) for c in range(copies)]) for m in (values, values.flip(0))
        ]
        base = models[0].roll(7)
        inputs = MergeInputs(models=models, base=base, tensor_name="w", field=UniformField(5, "w"))
        resident = FusedTensor(inputs, rule="random", consensus=True, resident=True)
        for weight in (
            [0.7, 0.3],
            [3.0, -2.5],
            [1e-30, 0.5],
        ):  # 1e-30: products near the subnormals
            check_same_finite_bits(inputs, weight, [0.6, 0.9], **dare_ties, fused_tensor=resident)
        assert 0 in resident._draw_tables  # the table path ran
        fast = resident.subnormal_free(torch.ones(2), torch.tensor([0.7, 0.3]).to(dtype))
        assert fast == (dtype == torch.bfloat16 and values is not every)


def check_same_finite_bits(
    inputs, weight, density, *, rule, consensus, resident=False, fused_tensor=None, **options
):
    expected = torch_path(inputs, weight, density, rule=rule, consensus=consensus, **options)
    fused_tensor = fused_tensor or FusedTensor(
        inputs, rule=rule, consensus=consensus, resident=resident
    )
    got = fused_tensor_merge(fused_tensor, weight, density, **options)
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(got), finite)
    assert torch.equal(bits(got)[finite], bits(expected)[finite]), (weight, options)


# The kernel as built for other x86 CPUs: without F16C, float16 rounds inside the loops by
# integer arithmetic; with F16C but no AVX-512, its conversions go 8 at a time instead of 16;
# without AVX512_BF16, bfloat16 takes the generic code everywhere. Each build: the dtype whose
# code it changes.
OTHER_X86_BUILDS = {
    "no-f16c": ("-mno-f16c", torch.float16),
    "f16c-no-avx512": ("-mno-avx512f", torch.float16),
    "no-avx512-bf16": ("-mno-avx512bf16", torch.bfloat16),
}


@pytest.fixture(scope="module", params=sorted(OTHER_X86_BUILDS))
def other_x86_library(request, tmp_path_factory):
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("F16C and AVX-512 are x86 extensions")
    built = tmp_path_factory.mktemp("kernel") / f"tv_merge_{request.param}.so"
    compiler = shutil.which("cc") or shutil.which("gcc")
    flag, dtype = OTHER_X86_BUILDS[request.param]
    subprocess.run(
        [compiler, *cpu.FLAGS, flag, str(cpu.SOURCE), "-o", str(built), "-lm"], check=True
    )
    library = ctypes.CDLL(str(built))
    cpu.declare(library)
    return library, dtype


@pytest.fixture
def other_x86_kernel(other_x86_library, monkeypatch):
    """The build, in place of the library; the dtype it concerns."""
    library, dtype = other_x86_library
    monkeypatch.setattr(cpu, "library", lambda: library)
    return dtype


@pytest.mark.parametrize(
    "resident,rule,consensus,normalize,rescale",
    [c[:1] + c[2:] for c in CASES if c[1] == torch.float16],
)
def test_other_x86_builds_match_torch_ops(
    other_x86_kernel, resident, rule, consensus, normalize, rescale
):
    check_kernel_matches_torch_ops(resident, other_x86_kernel, rule, consensus, normalize, rescale)


def test_other_x86_builds_round_every_value_like_torch(other_x86_kernel):
    check_every_finite_value(other_x86_kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_copy_finite_copies_and_sees_every_nan_and_inf(dtype):
    x = torch.randn((1 << 19) + 5).to(dtype)  # several threads' shares, a ragged end
    out = torch.empty_like(x)
    assert cpu.copy_finite(x, out) and torch.equal(out, x)
    for where in (0, 77_777, x.numel() - 1):
        for bad in (float("nan"), float("inf"), float("-inf")):
            y = x.clone()
            y[where] = bad
            assert not cpu.copy_finite(y, out)
            assert torch.equal(out.view(torch.uint8), y.view(torch.uint8))
    assert not cpu.copy_finite(
        torch.tensor([float("inf")]), torch.empty(1, dtype=torch.float64)
    )  # torch's copy


def test_the_merge_reports_an_inf_made_by_any_block():
    """The kernel's finiteness flag comes from its own pass: one overflowing element in any
    block (the last one ragged) is enough."""
    base = torch.zeros(3 * 256 + 7, dtype=torch.bfloat16)
    for where in (0, 300, base.numel() - 1):
        model = torch.ones_like(base)
        model[where] = 3e38
        inputs = MergeInputs(models=[model], base=base, tensor_name="w")
        merged, finite = FusedTensor(inputs, rule=None, consensus=False, resident=False).merge(
            weight=[10.0], density=[1.0], normalize=False, rescale=False, lambda_=1.0
        )
        assert (
            not finite
            and torch.isinf(merged[where])
            and torch.isfinite(merged).sum() == base.numel() - 1
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_gpu_self_check_passes_where_the_kernel_is_right(dtype):
    """gpu_ready's comparison, run here against the C kernel (on a GPU it runs the Triton one)."""
    from evomerge.kernel.task_vectors import self_check

    assert self_check(torch.device("cpu"), dtype) == ""
