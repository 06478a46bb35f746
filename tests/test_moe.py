"""Mixture-of-experts checkpoints: merged in the layout the sources are stored in.

transformers 5 keeps Mixtral's experts fused in memory (`mlp.experts.gate_up_proj`, (E, 2I, H))
but saves them per expert (`block_sparse_moe.experts.N.w1/w2/w3`), the layout of the hub, of
transformers 4 and of vLLM's loader. evomerge merges tensors as stored, so its output keeps that
layout; mergekit 0.1.5 writes the fused in-memory names instead. For elementwise methods both
load in transformers 5 to the same model, which the golden test checks. Methods with per-tensor
statistics (TIES/DARE/breadcrumbs trimming, SLERP norms, model_stock angles) differ by design:
mergekit 0.1.5 takes them over the fused tensor of all experts, evomerge over each expert's
tensor, as mergekit did when checkpoints and memory had one layout.

The merged folder also loads in vLLM (the `vllm` lane, `make test-vllm`; skipped where vLLM is
not installed): every weight found, none left over, and the engine's prompt log-probs and greedy
tokens agree with transformers 5 on the same folder.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from evomerge.cli import cli
from evomerge.merging.executor import run_merge
from evomerge.merging.recipe import parse_recipe

CONFIG = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
RECIPES = {
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: $m0\nmodels:\n"
    "  - model: $m1\n    parameters: {weight: 0.7}\n"
    "  - model: $m2\n    parameters: {weight: -0.2}\n",
    "linear": "merge_method: linear\nmodels:\n"
    "  - model: $m0\n    parameters: {weight: 0.6}\n"
    "  - model: $m1\n    parameters: {weight: 0.4}\n",
    "ties": "merge_method: ties\nbase_model: $m0\nmodels:\n"
    "  - model: $m1\n    parameters: {weight: 0.7, density: 0.5}\n"
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
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (
        info
    )
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
        w1, w3 = (
            written[f"model.layers.1.block_sparse_moe.experts.{expert}.{w}.weight"]
            for w in ("w1", "w3")
        )
        assert torch.equal(gate_up[expert], torch.cat([w1, w3]))


@pytest.mark.mergekit
def test_mergekit_merges_the_same_model(moe_pool, mergekit_python, tmp_path):
    from helpers.mergekit_env import run_driver

    jobs = {
        "threads": 1,
        "merges": [
            {
                "name": name,
                "recipe": recipe_text(name, moe_pool),
                "out": str(tmp_path / f"mk-{name}"),
                "seed": 0,
            }
            for name in ELEMENTWISE
        ],
    }
    results = run_driver(mergekit_python, jobs)
    for name in ELEMENTWISE:
        assert results[name]["ok"], results[name].get("traceback")
        run_merge(parse_recipe(recipe_text(name, moe_pool)), tmp_path / f"em-{name}")
        ours, theirs = loaded_state(tmp_path / f"em-{name}"), loaded_state(tmp_path / f"mk-{name}")
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{name}: {key}"


# vLLM's CPU attention needs head_dim >= 64; a wider init than the default 0.02 gives decisive
# logits, so greedy tokens are not decided by near-ties that rounding could flip.
VLLM_CONFIG = {
    **CONFIG,
    "hidden_size": 128,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 128,
    "initializer_range": 0.2,
}
VLLM_PROMPTS = [[1, 5, 9, 33, 2], [7, 7, 7], [60, 3, 41, 12, 8, 19, 25]]
LOGPROB_TOL = 1e-3  # as in test_vllm.py: float32, different kernels
GREEDY_TOKENS = 8


def fine_tune_like_pool(root: Path) -> Path:
    """A base and two variants of it (the base plus small noise), as a merge of fine-tunes sees."""
    torch.manual_seed(0)
    base = MixtralForCausalLM(MixtralConfig(**VLLM_CONFIG))
    base.save_pretrained(root / "m0")
    for seed in (1, 2):
        torch.manual_seed(seed)
        variant = MixtralForCausalLM(MixtralConfig(**VLLM_CONFIG))
        with torch.no_grad():
            for mine, theirs in zip(variant.parameters(), base.parameters(), strict=True):
                mine.copy_(theirs + 0.05 * theirs.std() * torch.randn_like(theirs))
        variant.save_pretrained(root / f"m{seed}")
    return root


def hf_prompt_logprobs_and_greedy(model, prompt: list[int]) -> tuple[list[float], list[int]]:
    """Each prompt token's log-prob after its prefix, and GREEDY_TOKENS greedy continuations."""
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
        given = logprobs[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0].tolist()
        tokens = list(prompt)
        for _ in range(GREEDY_TOKENS):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return given, tokens[len(prompt) :]


@pytest.mark.vllm
@pytest.mark.slow
def test_the_merged_folder_loads_in_vllm_and_agrees_with_transformers(tmp_path):
    """`evomerge merge` of two fine-tune-like variants, served by vLLM as transformers 5 runs it."""
    pytest.importorskip(
        "vllm", reason="vLLM is not installed here: `make vllm-venv`, then `make test-vllm`"
    )
    from vllm import SamplingParams, TokensPrompt

    from evomerge.fitness.vllm_backend import start_engine

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU build
    pool = fine_tune_like_pool(tmp_path / "pool")
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(RECIPES["ties"].replace("$m", f"{pool}/m"))
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["merge", str(recipe), str(out)])
    assert result.exit_code == 0, result.output
    written = load_file(str(out / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in written
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)

    # vLLM's loader raises on a checkpoint name it has no parameter for, and on a parameter
    # no checkpoint tensor filled: an engine that starts has found every weight, and only those.
    llm = start_engine(
        out, dtype="float32", max_model_len=64, enforce_eager=True, skip_tokenizer_init=True
    )
    try:
        params = SamplingParams(
            max_tokens=GREEDY_TOKENS,
            temperature=0.0,
            ignore_eos=True,
            prompt_logprobs=0,
            detokenize=False,
        )
        prompts = [TokensPrompt(prompt_token_ids=p) for p in VLLM_PROMPTS]
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        del llm  # one engine at a time on a small machine
        gc.collect()

    for prompt, output in zip(VLLM_PROMPTS, outputs, strict=True):
        want_logprobs, want_tokens = hf_prompt_logprobs_and_greedy(model, prompt)
        got_logprobs = [  # position 0 has no log-prob: nothing precedes it
            position[token].logprob
            for token, position in zip(prompt[1:], output.prompt_logprobs[1:], strict=True)
        ]
        for got, want in zip(got_logprobs, want_logprobs, strict=True):
            assert abs(got - want) <= LOGPROB_TOL, (prompt, got_logprobs, want_logprobs)
        assert list(output.outputs[0].token_ids) == want_tokens
