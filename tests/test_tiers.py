"""The host tier (evomerge/kernel/task_vectors.py `Staging`): a search's inputs kept in host
memory and streamed through one staging buffer into the merge give the device tier's numbers,
bit for bit. On the CPU the host tier still runs its own path: each tensor's operands copied
into the staging buffer, then merged from there into the live model."""

from __future__ import annotations

import random

import pytest
import torch
from test_candidate import live_model, space_over

SKILLS = ("add", "rev", "sort")
# the fused kernel's spaces (task arithmetic, TIES, DARE-TIES), and one run by torch ops
# (linear: merged on the host and pushed in the host tier)
FUSED = (
    "task_arithmetic_layers",
    "ties_layers",
    "dare_ties_layers",
    "dare_ties_layers_split",
    "dare_ties_global",
)


def _candidates(pool, name: str, dtype: str):
    from evomerge.spaces.parameters.candidate import CompiledCandidate

    torch.set_num_threads(1)
    space = space_over(pool, name, SKILLS, dtype)
    made = {}
    for tier in ("device", "host"):
        live = live_model(pool).to(getattr(torch, dtype))
        made[tier] = CompiledCandidate(live, space, seed=11, tier=tier)
    return space, made


def _genomes(space, count: int, seed: str):
    rng = random.Random(seed)
    yield from (list(space.baselines().values()) or [])[:1]
    for _ in range(count):
        yield {g.name: rng.uniform(g.low, g.high) for g in space.genes}


def _assert_same_bits(made) -> None:
    device, host = made["device"], made["host"]
    assert device.targets.keys() == host.targets.keys()
    for name, tensor in device.targets.items():
        assert torch.equal(tensor, host.targets[name]), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", [*FUSED, "linear_global"])
def test_the_host_tier_gives_the_device_tiers_bits(small_pool, name, dtype):
    space, made = _candidates(small_pool, name, dtype)
    if name in FUSED:
        assert made["host"].staging is not None and made["device"].staging is None
    else:
        assert made["host"].staging is None  # nothing the kernel merges: merged on the host
    for genome in _genomes(space, 3, name + dtype):
        for candidate in made.values():
            candidate.apply(genome)
        _assert_same_bits(made)


@pytest.mark.parametrize("name", ["ties_layers", "dare_ties_layers"])
def test_the_kept_tables_give_the_same_bits_through_the_staging_buffer(
    small_pool, monkeypatch, name
):
    """TIES's magnitude tables and DARE's draw tables, forced for the small pool's tensors:
    built from the host's task vectors, applied to their staged copies."""
    from evomerge.kernel import task_vectors

    monkeypatch.setattr(task_vectors, "MAGNITUDE_TABLE_MIN", 0)
    monkeypatch.setattr(task_vectors, "DRAW_TABLE_MIN", 0)
    space, made = _candidates(small_pool, name, "bfloat16")
    for genome in _genomes(space, 2, name):
        for candidate in made.values():
            candidate.apply(genome)
        _assert_same_bits(made)
    fused = [job.tensor.fused for job in made["host"].jobs]
    kept = [t._magnitude_tables if name == "ties_layers" else t._draw_tables for t in fused]
    assert any(kept)


def test_the_staging_buffer_is_made_once_and_every_tensor_moves_each_trial(small_pool):
    space, made = _candidates(small_pool, "dare_ties_layers", "bfloat16")
    host = made["host"]
    staging = host.staging
    buffer = staging.buffer.data_ptr()
    operands = sum(sum(t.nbytes for t in job.tensor.fused.host_operands()) for job in host.jobs)
    largest = max(
        sum(-(-t.nbytes // 256) * 256 for t in job.tensor.fused.host_operands())
        for job in host.jobs
    )
    assert staging.nbytes == largest  # on the CPU: one tensor's operands at a time
    genomes = list(_genomes(space, 2, "once"))
    for trial, genome in enumerate(genomes, start=1):
        host.apply(genome)
        assert staging.buffer.data_ptr() == buffer
        assert staging.moved == trial * operands
    host.apply(genomes[0], only={host.jobs[0].name})  # a subset: only its tensors move
    assert staging.moved == len(genomes) * operands + sum(
        t.nbytes for t in host.jobs[0].tensor.fused.host_operands()
    )


def test_ties_stages_only_its_base_and_task_vectors_whatever_the_device(small_pool):
    """No magnitude ranks (4 bytes per element per source) are kept or staged for TIES, on a
    GPU either: its cut is found per trial from the tables kept on the host
    (triton_merge.top_magnitudes)."""
    _, made = _candidates(small_pool, "ties_layers", "bfloat16")
    for job in made["host"].jobs:
        fused = job.tensor.fused
        assert len(fused.host_operands()) == fused.count + 1


def test_a_gpu_staging_buffer_holds_two_consecutive_tensors():
    from evomerge.kernel.task_vectors import staging_bytes

    assert staging_bytes([10, 40, 5, 30], pairs=False) == 40
    assert staging_bytes([10, 40, 5, 30], pairs=True) == 50
    assert staging_bytes([7], pairs=True) == 7 and staging_bytes([], pairs=True) == 0


def test_an_unknown_tier_is_refused(small_pool):
    from evomerge.errors import UserError
    from evomerge.spaces.parameters.candidate import CompiledCandidate

    space = space_over(small_pool, "task_arithmetic_layers", SKILLS)
    with pytest.raises(UserError, match="tier 'disk' is not one of device, host"):
        CompiledCandidate(live_model(small_pool), space, seed=0, tier="disk")


@pytest.mark.parametrize("name", ["dare_ties_layers", "ties_layers", "linear_global"])
def test_the_plan_counts_the_staging_buffer_and_the_bytes_a_trial_copies(small_pool, name):
    """The host tier's plan (evomerge/search/memory_plan.py, headers only) against the buffer
    the candidate makes and the bytes it copies in a trial: equal."""
    from evomerge.search.memory_plan import host_tier, plan_space

    space, made = _candidates(small_pool, name, "bfloat16")
    host = made["host"]
    plan = host_tier(plan_space(space, base=str(small_pool / "base"), live_dtype="bfloat16"))
    staging = host.staging
    assert plan.item("staging").bytes == (staging.nbytes if staging is not None else 0)
    before = staging.moved if staging is not None else 0
    host.apply(next(_genomes(space, 1, name)))
    copied = (staging.moved if staging is not None else 0) - before
    pushed = sum(job.target.nbytes for job in host.jobs if not getattr(job.tensor, "fused", None))
    assert plan.link_bytes == copied + pushed


def test_the_search_compiles_the_tier_its_config_names(small_pool, tmp_path):
    """`search.tier` reaches the candidate (evomerge/search/loop.py `make_candidate`); on the
    CPU `auto` is the device tier (the host tier would hold a staging buffer more in the same
    memory); an unknown tier is refused when the config is read."""
    import yaml
    from helpers.pool_fixtures import pool_search_config

    from evomerge.errors import UserError
    from evomerge.search.config import load_run_config
    from evomerge.search.loop import make_candidate
    from evomerge.search.memory_plan import resolve_tier
    from evomerge.search.run_folder import build_space

    got = {}
    for tier in ("auto", "device", "host", "disk"):
        search = {"tier": tier, "trials": 1}
        config = pool_search_config(
            small_pool, tasks=["add"], subset=4, search=search, space="task_arithmetic_layers"
        )
        path = tmp_path / f"{tier}.yaml"
        path.write_text(yaml.safe_dump(config))
        if tier == "disk":
            with pytest.raises(UserError, match="search.tier"):
                load_run_config(path)
            continue
        config = load_run_config(path)
        candidate = make_candidate(live_model(small_pool), build_space(config), config)
        got[tier] = (resolve_tier(config), candidate.staging is not None)
    assert got == {"auto": ("device", False), "device": ("device", False), "host": ("host", True)}


FUSED_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", FUSED_METHODS)
def test_every_fused_method_gives_the_same_bits_from_the_staging_buffer(method, dtype):
    """Every method the fused kernel takes, at sizes either side of TIES's magnitude tables
    (65,536 elements) and DARE's draw tables (1M), with and without the rescale, the
    normalisation and lambda: the host tier's merge through one shared staging buffer (three
    tensors, one after another) against the device tier's, bit for bit."""
    from evomerge.kernel.task_vectors import FusedTensor, Staging, prepare_host
    from evomerge.methods import get_method
    from evomerge.methods.random_fields import UniformField
    from evomerge.methods.registry import MergeInputs

    merge_method = get_method(method)
    rules = merge_method.task_vectors
    generator = torch.Generator().manual_seed(3)

    def inputs(numel: int, name: str) -> MergeInputs:
        base = torch.randn(numel, generator=generator)
        models = [base + 0.01 * torch.randn(numel, generator=generator) for _ in range(3)]
        field = UniformField(5, name)
        return MergeInputs([m.to(dtype) for m in models], base.to(dtype), name, field)

    sizes = {"small": 4099, "tabled": 70_000, "drawn": (1 << 20) + 5}
    device = {
        name: FusedTensor(
            inputs(numel, name), rule=rules.sparsify, consensus=rules.consensus, resident=True
        )
        for name, numel in sizes.items()
    }
    generator.manual_seed(3)  # the same inputs again, for the host tier
    host = {
        name: prepare_host(merge_method, inputs(n, name), device="cpu") for name, n in sizes.items()
    }
    staging = Staging("cpu", list(host.values()))
    cases = [
        dict(weight=[0.6, -0.3, 0.9], density=[0.3, 0.5, 1.0], rescale=True, normalize=False),
        dict(weight=[0.5, 0.5, 0.2], density=[0.2, 0.7, 0.4], rescale=False, normalize=True),
        dict(weight=[-0.6, -0.3, -0.9], density=[1.0] * 3, rescale=True, normalize=True),
    ]
    for case, lambda_ in zip(cases, (1.0, 0.8, 1.3)):
        for name in sizes:
            want, want_finite = device[name].merge(**case, lambda_=lambda_)
            got, got_finite = host[name].merge(**case, lambda_=lambda_)
            bits = torch.int16 if got.itemsize == 2 else torch.int32
            assert torch.equal(got.view(bits), want.view(bits)), (name, case)
            assert got_finite == want_finite
    assert staging.moved == len(cases) * sum(
        sum(t.nbytes for t in tensor.host_operands()) for tensor in host.values()
    )


def test_the_gpu_layout_prefetches_into_the_other_end_and_keeps_the_bits(small_pool, monkeypatch):
    """The GPU's layout of the staging buffer (two consecutive tensors, at its two ends, the
    next one copied before this one merges), run on the CPU: the same bits for whole trials
    and for subsets of tensors, whose skipped neighbours are never read stale."""
    import functools

    from evomerge.kernel import task_vectors

    monkeypatch.setattr(
        task_vectors, "Staging", functools.partial(task_vectors.Staging, pairs=True)
    )
    space, made = _candidates(small_pool, "dare_ties_layers", "bfloat16")
    staging = made["host"].staging
    assert staging.pairs and staging.nbytes > max(
        sum(-(-t.nbytes // 256) * 256 for t in job.tensor.fused.host_operands())
        for job in made["host"].jobs
    )
    names = [job.name for job in made["host"].jobs]
    rng = random.Random(0)
    subsets = [None, set(names[::2]), set(names[1::3]), None, set(rng.sample(names, 5)), None]
    for genome, only in zip(_genomes(space, len(subsets), "pairs"), subsets):
        for candidate in made.values():
            candidate.apply(genome, only=only)
        _assert_same_bits(made)
    # a copy over a place that holds another tensor's unread copy: that one is copied again
    first, third = (made["host"].jobs[i].tensor.fused.stage for i in (0, 2))
    assert first.start < third.end and third.start < first.end  # both at the buffer's start
    first.fetch()
    third.fetch()
    genome = next(_genomes(space, 1, "overwritten"))
    for candidate in made.values():
        candidate.apply(genome, only={names[0]})
    _assert_same_bits(made)
