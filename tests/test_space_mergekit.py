"""Any genome of any bundled search space decodes to a recipe that mergekit 0.1.5 runs, with
the same tensors as `evomerge merge` (deterministic methods) — the search's recipes are
ordinary recipes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.merging.executor import run_merge
from evomerge.methods import get_method
from evomerge.spaces.parameters.space import SearchSpace, load_space

pytestmark = pytest.mark.mergekit

# Parameter spaces (a data-flow space, `kind: dataflow`, is checked against mergekit in
# tests/test_dataflow.py).
SPACES = sorted(  # parameter spaces whose method mergekit 0.1.5 has (regmean is evomerge's)
    p.stem
    for p in (Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml")
    if "kind" not in (data := yaml.safe_load(p.read_text()) or {})
    and get_method(data["method"]).mergekit
)


def _space(name: str, pool: dict[str, Path]) -> SearchSpace:
    config = load_space(name)
    models = {n: str(p) for n, p in pool.items() if n != "base"}
    if config.method == "slerp":  # slerp merges the base and one model
        models = dict(list(models.items())[:1])
    return SearchSpace(config, base=str(pool["base"]), models=models, num_layers=4, dtype="float32")


def _genome(space: SearchSpace, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    genome = {g.name: rng.uniform(g.low, g.high) for g in space.genes}
    if space.method.randomized:  # DARE's masks come from different RNGs: compare undropped
        genome.update({g.name: 1.0 for g in space.genes if g.param == "density"})
    return genome


def test_decoded_genomes_run_in_mergekit_with_the_same_result(tmp_path, mergekit_python):
    from helpers.mergekit_env import run_driver
    from helpers.tiny_models import build_tiny_pool

    torch.set_num_threads(1)
    pool = build_tiny_pool(tmp_path / "pool", dtype=torch.float32, seed=5)
    jobs, ours = [], {}
    for name in SPACES:
        recipe = _space(name, pool).recipe(_genome(_space(name, pool), seed=len(name)))
        run_merge(recipe, tmp_path / "evo" / name, seed=0)
        ours[name] = tmp_path / "evo" / name
        jobs.append(
            {
                "name": name,
                "recipe": recipe.to_yaml(),
                "out": str(tmp_path / "mk" / name),
                "seed": 0,
            }
        )
    results = run_driver(mergekit_python, {"threads": 1, "merges": jobs})
    for name in SPACES:
        assert results[name]["ok"], (
            f"mergekit refused the {name} recipe: {results[name].get('error')}"
        )
        a = load_file(str(ours[name] / "model.safetensors"))
        b = load_file(str(tmp_path / "mk" / name / "model.safetensors"))
        assert a.keys() == b.keys(), name
        for key in a:
            # ties trims by magnitude: exact ties in |delta| may be broken differently (fp32: rare)
            assert (
                torch.allclose(a[key], b[key], rtol=0, atol=1e-6)
                if name.startswith("ties")
                else torch.equal(a[key], b[key])
            ), (name, key)
