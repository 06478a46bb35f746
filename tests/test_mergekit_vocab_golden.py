"""Vocabularies that differ, merged by evomerge and by mergekit 0.1.5: the same output
vocabulary (token for token, id for id), the same vocab_size, the same tensors bit for bit.

The pool (helpers/vocab_models.py) has real BPE tokenizers: an added pad, added chat tokens
with a changed eos, rows padded beyond the tokenizer, a tokenizer with a token beyond the
model's rows, ordinary added tokens; untied and tied embeddings. Recipes name one model that
adds tokens besides the base (with two, mergekit's union orders the new tokens by its set of
models, which changes from run to run: see the README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.merging.executor import run_merge
from evomerge.merging.recipe import parse_recipe

pytestmark = pytest.mark.mergekit

CASES = {
    # 32000 vs 32001: a fine-tune that added a pad
    "union_added_pad": """
merge_method: linear
base_model: $base
tokenizer_source: union
models:
  - model: $base
    parameters: {weight: 0.4}
  - model: $pad
    parameters: {weight: 0.6}
""",
    # added special tokens, and a fine-tune whose eos is <|im_end|>
    "union_chat_tokens_task_arithmetic": """
merge_method: task_arithmetic
base_model: $base
tokenizer_source: union
chat_template: chatml
models:
  - model: $chat
    parameters: {weight: 0.7}
""",
    "base_over_chat_tokens": """
merge_method: ties
base_model: $base
tokenizer_source: base
chat_template: auto
parameters: {density: 1.0}
models:
  - model: $chat
    parameters: {weight: 1.0}
  - model: $pad
    parameters: {weight: 0.5}
""",
    "model_source_chat": """
merge_method: linear
tokenizer_source: $chat
models:
  - model: $base
    parameters: {weight: 0.5}
  - model: $chat
    parameters: {weight: 0.5}
""",
    # rows padded beyond the tokenizer (152064 vs 151665), with and without padding
    "union_padded_rows": """
merge_method: linear
base_model: $base
tokenizer_source: union
models:
  - model: $base
    parameters: {weight: 0.5}
  - model: $padded
    parameters: {weight: 0.5}
""",
    "block_pad_to_multiple": """
merge_method: linear
base_model: $base
tokenizer:
  source: union
  pad_to_multiple_of: 16
models:
  - model: $base
    parameters: {weight: 0.3}
  - model: $padded
    parameters: {weight: 0.7}
""",
    # a tokenizer with a token beyond the model's rows (an added pad never resized): stripped
    "base_with_unused_token": """
merge_method: linear
base_model: $unused
tokenizer_source: base
models:
  - model: $unused
    parameters: {weight: 0.5}
  - model: $pad
    parameters: {weight: 0.5}
""",
    # the tokenizer block: chosen embeddings for new tokens, forced, zero, from another token
    "block_tokens": """
merge_method: linear
base_model: $base
tokenizer:
  source: union
  tokens:
    <|im_start|>:
      source: {kind: model_token, model: $base, token: <s>}
    <|im_end|>:
      source: $chat
      force: true
    <newtok>:
      source: {kind: zero}
    <copy>:
      source: {kind: model_token, model: $chat, token_id: 3}
models:
  - model: $base
    parameters: {weight: 0.5}
  - model: $chat
    parameters: {weight: 0.5}
""",
    "union_ordinary_tokens_slerp": """
merge_method: slerp
base_model: $base
tokenizer_source: union
parameters: {t: 0.3}
models:
  - model: $base
  - model: $other
""",
}


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    from helpers.vocab_models import build_vocab_pool

    root = tmp_path_factory.mktemp("vocab")
    return {
        "untied": build_vocab_pool(root / "untied"),
        "tied": build_vocab_pool(root / "tied", tied=True),
    }


@pytest.fixture(scope="module")
def merged(pools, mergekit_python, tmp_path_factory):
    """{(case, pool): (evomerge folder, mergekit folder)}, mergekit's all in one process."""
    from helpers.mergekit_env import fill_in_paths, run_driver

    root = tmp_path_factory.mktemp("vocab-out")
    jobs, outs = [], {}
    for pool_name, folders in pools.items():
        for case, text in CASES.items():
            recipe = fill_in_paths(text, folders)
            ours, theirs = root / f"{case}-{pool_name}-evo", root / f"{case}-{pool_name}-mk"
            run_merge(parse_recipe(recipe), ours)
            jobs.append({"name": f"{case}-{pool_name}", "recipe": recipe, "out": str(theirs)})
            outs[(case, pool_name)] = (ours, theirs)
    results = run_driver(mergekit_python, {"threads": 1, "merges": jobs})
    failed = {k: v["error"] for k, v in results.items() if not v["ok"]}
    assert not failed, failed
    return outs


def _vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def _rendered(folder: Path) -> str | None:
    """A conversation through the folder's chat template (None without one)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if not tokenizer.chat_template:
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("pool", ["untied", "tied"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_vocabulary_merge_matches_mergekit(merged, case, pool):
    ours, theirs = merged[(case, pool)]
    assert _vocab(ours) == _vocab(theirs)
    assert _rendered(ours) == _rendered(theirs)  # the same template (named, auto or the source's)
    config_ours = json.loads((ours / "config.json").read_text())
    config_theirs = json.loads((theirs / "config.json").read_text())
    assert config_ours["vocab_size"] == config_theirs["vocab_size"]
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name
