"""Compiled candidates: a genome written into the compiled jobs gives the model that
`evomerge merge` makes of the genome's recipe, bit for bit, for every bundled space."""

from __future__ import annotations

import random

import pytest
import torch
from helpers.statistics import give_statistics


def parameter_spaces() -> dict[str, tuple[str, ...]]:
    """Every parameter space in search_spaces/ (a glob, not a list to keep in step) -> the pool
    models it merges: one where its method merges one model into the base."""
    from evomerge.methods import get_method
    from evomerge.spaces.registry import BUNDLED, PARAMETERS, kind_of, read_space

    out = {}
    for path in sorted(BUNDLED.glob("*.yaml")):
        data, _ = read_space(path)
        if kind_of(data) == PARAMETERS:
            one = get_method(data["method"]).max_models == 1
            out[path.stem] = ("add",) if one else ("add", "rev", "sort")
    return out


SPACES = parameter_spaces()


def test_the_contract_covers_every_bundled_parameter_space():
    assert {"ramplus_tl_layers", "slerp_layers", "dare_ties_layers_split"} <= set(SPACES)


def space_over(pool, name: str, models, dtype="float32"):
    from evomerge.io.checkpoint import Checkpoint
    from evomerge.spaces.parameters.space import SearchSpace, load_space

    return SearchSpace(
        load_space(name),
        base=str(pool / "base"),
        models={m: str(pool / m) for m in models},
        num_layers=Checkpoint(pool / "base").num_layers,
        dtype=dtype,
    )


def live_model(pool):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(pool / "base", use_safetensors=True).eval()


@pytest.mark.parametrize("name", sorted(SPACES))
def test_a_compiled_candidate_is_the_merge_of_its_recipe(tmp_path, small_pool, name):
    from safetensors.torch import load_file

    from evomerge.merging.executor import run_merge
    from evomerge.spaces.parameters.candidate import CompiledCandidate

    torch.set_num_threads(1)
    space = give_statistics(space_over(small_pool, name, SPACES[name]), tmp_path / "statistics")
    candidate = CompiledCandidate(live_model(small_pool), space, seed=11)
    rng = random.Random(name)
    for attempt in range(2):  # a second genome: every slot is rewritten, nothing left over
        genome = {g.name: rng.uniform(g.low, g.high) for g in space.genes}
        candidate.apply(genome)
        out = run_merge(space.recipe(genome), tmp_path / f"merged-{attempt}", seed=11).out_dir
        merged = load_file(str(out / "model.safetensors"))
        assert merged.keys() == candidate.targets.keys()
        for tensor, live in candidate.targets.items():
            assert torch.equal(live, merged[tensor]), (tensor, attempt)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_ties_candidate_from_magnitude_tables_is_the_merge_and_keeps_no_ranks(
    tmp_path, small_pool, monkeypatch, dtype
):
    """TIES in a search on the CPU finds each trial's top-k from a magnitude table per source
    and tensor (forced here for the small pool's tensors, which would keep ranks no larger than
    a table): the merge's bits, and no magnitude ranks kept."""
    from safetensors.torch import load_file

    from evomerge.kernel import task_vectors
    from evomerge.merging.executor import run_merge
    from evomerge.spaces.parameters.candidate import CompiledCandidate

    monkeypatch.setattr(task_vectors, "MAGNITUDE_TABLE_MIN", 0)
    torch.set_num_threads(1)
    space = space_over(small_pool, "ties_layers", SPACES["ties_layers"], dtype)
    live = live_model(small_pool).to(getattr(torch, dtype))
    candidate = CompiledCandidate(live, space, seed=11)
    rng = random.Random(dtype)
    for attempt in range(2):
        genome = {g.name: rng.uniform(g.low, g.high) for g in space.genes}
        candidate.apply(genome)
        out = run_merge(space.recipe(genome), tmp_path / f"merged-{attempt}", seed=11).out_dir
        merged = load_file(str(out / "model.safetensors"))
        for tensor, live_tensor in candidate.targets.items():
            assert torch.equal(live_tensor, merged[tensor]), (tensor, attempt)
    fused = [job.tensor.fused for job in candidate.jobs if job.tensor.fused is not None]
    assert fused and any(tensor._magnitude_tables for tensor in fused)
    for tensor in fused:
        ranks = [key for key in tensor.inputs._memo if key[0] == "desc"]
        assert ranks == [], f"{tensor.inputs.tensor_name} keeps magnitude ranks"


def test_a_candidate_with_an_inf_is_refused(small_pool):
    """Weights that overflow float32 (to Inf, as the merge dtype reads them): the kernel's pass
    (task arithmetic) and the checked copy (linear's torch code) both report it."""
    from evomerge.errors import CandidateError
    from evomerge.spaces.parameters.candidate import CompiledCandidate

    torch.set_num_threads(1)
    for name in ("task_arithmetic_layers", "linear_global"):
        space = space_over(small_pool, name, ("add", "rev"))
        candidate = CompiledCandidate(live_model(small_pool), space, seed=0)
        candidate.apply({g.name: g.high for g in space.genes})  # in bounds: finite
        genome = {
            g.name: 1e40 for g in space.genes
        }  # beyond the bounds: the search never asks this
        with pytest.raises(CandidateError, match="NaN or Inf"):
            candidate.apply(genome)


@pytest.fixture(scope="module")
def adapters(small_pool, tmp_path_factory):
    """Two LoRA adapters of the small pool's base (one rank-stabilised, per-module ranks)."""
    from helpers.tiny_models import write_adapter

    root = tmp_path_factory.mktemp("adapters")
    base = small_pool / "base"
    lora = write_adapter(root / "lora", base, seed=3)
    ranks = {"down_proj": 2}
    rslora = write_adapter(root / "rslora", base, seed=4, use_rslora=True, rank_pattern=ranks)
    return {"lora": f"{base}+{lora}", "rslora": f"{base}+{rslora}"}


def adapter_space(pool, name: str, models: dict, dtype: str):
    from evomerge.io.checkpoint import Checkpoint
    from evomerge.spaces.parameters.space import SearchSpace, load_space

    return SearchSpace(
        load_space(name),
        base=str(pool / "base"),
        models=models,
        num_layers=Checkpoint(pool / "base").num_layers,
        dtype=dtype,
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(SPACES))
def test_a_candidate_over_adapters_is_the_merge_of_its_recipe(
    tmp_path, small_pool, adapters, name, dtype
):
    """Adapters kept factored (formed per tensor per trial) give `evomerge merge`'s bits, beside
    a full fine-tune in the same pool."""
    from safetensors.torch import load_file

    from evomerge.merging.executor import run_merge
    from evomerge.merging.factored import FactoredTensor
    from evomerge.spaces.parameters.candidate import CompiledCandidate

    torch.set_num_threads(1)
    models = (
        {"rslora": adapters["rslora"]}
        if len(SPACES[name]) == 1
        else {"add": str(small_pool / "add"), **adapters}
    )
    space = give_statistics(adapter_space(small_pool, name, models, dtype), tmp_path / "stats")
    candidate = CompiledCandidate(live_model(small_pool).to(getattr(torch, dtype)), space, seed=5)
    assert any(isinstance(job.tensor, FactoredTensor) for job in candidate.jobs)
    rng = random.Random(name)
    for attempt in range(2):
        genome = {g.name: rng.uniform(g.low, g.high) for g in space.genes}
        candidate.apply(genome)
        out = run_merge(space.recipe(genome), tmp_path / f"merged-{attempt}", seed=5).out_dir
        merged = load_file(str(out / "model.safetensors"))
        for tensor, live in candidate.targets.items():
            assert torch.equal(live, merged[tensor]), (tensor, attempt)


def test_an_adapter_pool_keeps_the_base_and_the_factors_only(small_pool, adapters):
    """Between trials a pool of adapters holds the base's tensors (shared by every adapter and
    the base) and the factors: nothing of full-model size per adapter."""
    from evomerge.io.adapters import open_checkpoint
    from evomerge.io.checkpoint import Checkpoint
    from evomerge.spaces.parameters.candidate import CompiledCandidate

    torch.set_num_threads(1)
    space = adapter_space(small_pool, "dare_ties_layers", dict(adapters), "float32")
    candidate = CompiledCandidate(live_model(small_pool), space, seed=0)
    kept = sum(job.tensor.resident_bytes() for job in candidate.jobs)
    base = Checkpoint(small_pool / "base")
    factors = [f for ref in adapters.values() for f in open_checkpoint(ref).factors.values()]
    expected = sum(base.tensor(n).nbytes for n in candidate.targets) + sum(
        f.a.nbytes + f.b.nbytes for f in factors
    )
    assert kept == expected


def test_adapters_keep_dare_draw_tables_and_the_merge_bits(tmp_path):
    """Tensors of 2^20 elements or more: DARE's L1 rescale is read from draw tables kept across
    trials (built from the first trial's transient task vector); the bits stay the plain merge's."""
    from helpers.tiny_models import build_tiny_pool, write_adapter
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from evomerge.kernel.task_vectors import DRAW_TABLE_MIN
    from evomerge.merging.executor import run_merge
    from evomerge.spaces.parameters.candidate import CompiledCandidate

    torch.set_num_threads(1)
    folders = build_tiny_pool(
        tmp_path / "pool", n_models=0, num_hidden_layers=2, intermediate_size=DRAW_TABLE_MIN // 32
    )
    base = folders["base"]
    models = {
        name: f"{base}+{write_adapter(tmp_path / name, base, seed=seed)}"
        for seed, name in enumerate(("a", "b"))
    }
    space = adapter_space(tmp_path / "pool", "dare_ties_layers", models, "float32")
    live = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True).eval()
    candidate = CompiledCandidate(live, space, seed=2)
    rng = random.Random(0)
    for attempt in range(2):
        genome = {g.name: rng.uniform(g.low, g.high) for g in space.genes}
        candidate.apply(genome)
        merged = load_file(
            str(
                run_merge(space.recipe(genome), tmp_path / f"m{attempt}", seed=2).out_dir
                / "model.safetensors"
            )
        )
        for tensor, value in candidate.targets.items():
            assert torch.equal(value, merged[tensor]), (tensor, attempt)
    large = [
        job for job in candidate.jobs if job.target.numel() >= DRAW_TABLE_MIN
    ]  # gate, up, down
    assert len(large) == 3 * 2 and all(len(job.tensor.draw_tables) == 2 for job in large)
