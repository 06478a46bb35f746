"""Compiled candidates: a genome written into the compiled jobs gives the model that
`evomerge merge` makes of the genome's recipe, bit for bit, for every bundled space."""

from __future__ import annotations

import random

import pytest
import torch

SPACES = {  # space -> the pool models it merges
    "task_arithmetic_layers": ("add", "rev", "sort"),
    "dare_ties_layers": ("add", "rev", "sort"),
    "dare_ties_layers_split": ("add", "rev", "sort"),
    "dare_ties_global": ("add", "rev", "sort"),
    "ties_layers": ("add", "rev", "sort"),
    "linear_global": ("add", "rev", "sort"),
    "slerp_layers": ("add",),
}


def space_over(pool, name: str, models, dtype="float32"):
    from evomerge.checkpoint import Checkpoint
    from evomerge.space import SearchSpace, load_space

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

    from evomerge.candidate import CompiledCandidate
    from evomerge.merge import run_merge

    torch.set_num_threads(1)
    space = space_over(small_pool, name, SPACES[name])
    candidate = CompiledCandidate(live_model(small_pool), space, seed=11)
    rng = random.Random(name)
    for attempt in range(2):  # a second genome: every slot is rewritten, nothing left over
        genome = {g.name: rng.uniform(g.low, g.high) for g in space.genes}
        candidate.apply(genome)
        out = run_merge(space.decode(genome), tmp_path / f"merged-{attempt}", seed=11).out_dir
        merged = load_file(str(out / "model.safetensors"))
        assert merged.keys() == candidate.targets.keys()
        for tensor, live in candidate.targets.items():
            assert torch.equal(live, merged[tensor]), (tensor, attempt)


def test_a_candidate_with_an_inf_is_refused(small_pool):
    """Weights that overflow float32 (to Inf, as the merge dtype reads them): the kernel's pass
    (task arithmetic) and the checked copy (linear's torch code) both report it."""
    from evomerge.candidate import CandidateError, CompiledCandidate

    torch.set_num_threads(1)
    for name in ("task_arithmetic_layers", "linear_global"):
        space = space_over(small_pool, name, ("add", "rev"))
        candidate = CompiledCandidate(live_model(small_pool), space, seed=0)
        candidate.apply({g.name: g.high for g in space.genes})  # in bounds: finite
        genome = {g.name: 1e40 for g in space.genes}  # beyond the bounds: the search never asks this
        with pytest.raises(CandidateError, match="NaN or Inf"):
            candidate.apply(genome)
