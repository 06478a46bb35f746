"""Mixture-of-experts checkpoints: merged in the layout the sources are stored in.

transformers 5 keeps Mixtral's experts fused in memory (`mlp.experts.gate_up_proj`, (E, 2I, H))
but saves them per expert (`block_sparse_moe.experts.N.w1/w2/w3`), the layout of the hub, of
transformers 4 and of vLLM's loader. evomerge merges tensors as stored, so its output keeps that
layout; mergekit 0.1.5 writes the fused in-memory names instead. For elementwise methods both
load in transformers 5 to the same model, which the golden test checks. Methods with per-tensor
statistics (TIES/DARE/breadcrumbs trimming, SLERP norms, model_stock angles) differ by design:
mergekit 0.1.5 takes them over the fused tensor of all experts, evomerge over each expert's
tensor, as mergekit did when checkpoints and memory had one layout.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from evomerge.merge import run_merge
from evomerge.recipe import parse_recipe

CONFIG = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    tie_word_embeddings=False,
)
RECIPES = {
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: $m0\nmodels:\n  - model: $m1\n    parameters: {weight: 0.7}\n"
    "  - model: $m2\n    parameters: {weight: -0.2}\n",
    "linear": "merge_method: linear\nmodels:\n  - model: $m0\n    parameters: {weight: 0.6}\n  - model: $m1\n    parameters: {weight: 0.4}\n",
    "ties": "merge_method: ties\nbase_model: $m0\nmodels:\n  - model: $m1\n    parameters: {weight: 0.7, density: 0.5}\n"
    "  - model: $m2\n    parameters: {weight: 0.5, density: 0.8}\n",
}

ELEMENTWISE = ("linear", "task_arithmetic")


@pytest.fixture(scope="module")
def moe_pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    for seed in range(3):
        torch.manual_seed(seed)
        MixtralForCausalLM(MixtralConfig(**CONFIG)).save_pretrained(root / f"m{seed}")
    return root


def recipe_text(name: str, root: Path) -> str:
    return RECIPES[name].replace("$m", f"{root}/m")


def loaded_state(folder: Path) -> dict[str, torch.Tensor]:
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_output_keeps_the_per_expert_layout_and_loads(moe_pool, tmp_path, name):
    run_merge(parse_recipe(recipe_text(name, moe_pool)), tmp_path / "out")
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    source = load_file(str(moe_pool / "m0" / "model.safetensors"))
    assert written.keys() == source.keys()
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in written
    state = loaded_state(tmp_path / "out")
    gate_up = state["model.layers.1.mlp.experts.gate_up_proj"]  # (E, 2I, H): w1 rows, then w3
    for expert in range(CONFIG["num_local_experts"]):
        w1, w3 = (written[f"model.layers.1.block_sparse_moe.experts.{expert}.{w}.weight"] for w in ("w1", "w3"))
        assert torch.equal(gate_up[expert], torch.cat([w1, w3]))


@pytest.mark.mergekit
def test_mergekit_merges_the_same_model(moe_pool, mergekit_python, tmp_path):
    from mergekit_env import run_driver

    jobs = {"threads": 1, "merges": [
        {"name": name, "recipe": recipe_text(name, moe_pool), "out": str(tmp_path / f"mk-{name}"), "seed": 0}
        for name in ELEMENTWISE
    ]}
    results = run_driver(mergekit_python, jobs)
    for name in ELEMENTWISE:
        assert results[name]["ok"], results[name].get("traceback")
        run_merge(parse_recipe(recipe_text(name, moe_pool)), tmp_path / f"em-{name}")
        ours, theirs = loaded_state(tmp_path / f"em-{name}"), loaded_state(tmp_path / f"mk-{name}")
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{name}: {key}"
