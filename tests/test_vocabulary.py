"""Vocabularies that differ and chat templates, in `evomerge merge` (no mergekit needed; the
tensor-for-tensor comparison with mergekit 0.1.5 is tests/test_mergekit_vocab_golden.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.errors import UserError
from evomerge.merging.executor import run_merge
from evomerge.merging.recipe import parse_recipe


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from helpers.vocab_models import build_vocab_pool

    return build_vocab_pool(tmp_path_factory.mktemp("vocab"))


def _merge(tmp_path: Path, text: str, pool: dict) -> Path:
    from helpers.mergekit_env import fill_in_paths

    out = tmp_path / "out"
    run_merge(parse_recipe(fill_in_paths(text, pool)), out)
    return out


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_tokenizer_block_is_read_as_mergekit_writes_it():
    recipe = parse_recipe(
        """
merge_method: linear
tokenizer:
  source: union
  tokens:
    <|im_end|>: {source: chat, force: true}
    <|im_start|>: {source: {kind: model_token, model: base, token: <s>}}
    <z>: {source: {kind: zero}}
  pad_to_multiple_of: 64
models: [{model: base, parameters: {weight: 1}}, {model: chat, parameters: {weight: 1}}]
"""
    )
    assert recipe.tokenizer.pad_to_multiple_of == 64
    assert recipe.vocabulary_source() == "union"
    assert recipe.tokenizer_models() == ["chat", "base"]
    assert parse_recipe(recipe.to_yaml()) == recipe  # written back as it was read


@pytest.mark.parametrize(
    "block, fragment",
    [
        ("tokenizer_source: union\ntokenizer: {source: base}", "not both"),
        ("tokenizer: {sorce: union}", "did you mean 'source'"),
        ("tokenizer: {tokens: {x: {source: {kind: model_token, model: a}}}}", "token_id"),
        ("tokenizer: {pad_to_multiple_of: 0}", "pad_to_multiple_of"),
        ("chat_template: chatlm", "did you mean 'chatml'"),
        ("chat_template: mytemplate", "neither a bundled template nor Jinja"),
    ],
)
def test_bad_tokenizer_settings_are_one_sentence(block, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_recipe(f"merge_method: linear\n{block}\nmodels: [{{model: a}}]")


def test_union_with_added_tokens_aligns_rows_by_token(pool, tmp_path):
    from helpers.vocab_models import base_tokens, vocab_of

    out = _merge(
        tmp_path,
        """
merge_method: linear
base_model: $base
tokenizer_source: union
models:
  - model: $base
    parameters: {weight: 0.5}
  - model: $chat
    parameters: {weight: 0.5}
""",
        pool,
    )
    vocab = vocab_of(out)
    n = len(base_tokens())
    assert vocab["<|im_start|>"] == n and vocab["<|im_end|>"] == n + 1 and len(vocab) == n + 2
    assert _json(out / "config.json")["vocab_size"] == n + 2
    merged = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    base = load_file(pool["base"] / "model.safetensors")["model.embed_tokens.weight"]
    chat = load_file(pool["chat"] / "model.safetensors")["model.embed_tokens.weight"]
    assert merged.shape == (n + 2, base.shape[1])
    torch.testing.assert_close(merged[:n], (base + chat[:n]) / 2)
    torch.testing.assert_close(merged[n:], chat[n:])  # only chat has them: its rows


def test_differing_vocabularies_without_a_source_name_the_fix(pool, tmp_path):
    from helpers.mergekit_env import fill_in_paths

    text = "merge_method: linear\nmodels: [{model: $base}, {model: $pad}]"
    with pytest.raises(UserError, match="tokenizer_source: union"):
        run_merge(parse_recipe(fill_in_paths(text, pool)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_added_pad_merged_model_loads_in_transformers(pool, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _merge(
        tmp_path,
        """
merge_method: task_arithmetic
base_model: $base
tokenizer: {source: union, pad_to_multiple_of: 8}
models:
  - model: $pad
    parameters: {weight: 1.0}
""",
        pool,
    )
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values())
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == 40  # 38 tokens, padded to 8
    assert tokenizer.convert_tokens_to_ids("<pad>") == 37


def test_exaone_renders_the_exaone_format(pool):
    """A departure: mergekit's exaone.jinja indents its expression lines, so its output carries
    spaces and blank lines the EXAONE format has not; evomerge's renders the format itself."""
    from transformers import AutoTokenizer

    from evomerge.merging.chat import NAMED_TEMPLATES

    tokenizer = AutoTokenizer.from_pretrained(pool["base"])
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text = tokenizer.apply_chat_template(
        messages,
        chat_template=NAMED_TEMPLATES["exaone"],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == (
        "[|system|][|endofturn|]\n[|user|]hi\n[|assistant|]hello[|endofturn|]\n[|assistant|]"
    )


@pytest.mark.parametrize("name", ["chatml", "llama3", "mistral", "alpaca"])
def test_named_templates_render_as_mergekits(name, pool):
    """Each bundled template renders a conversation exactly as mergekit 0.1.5's file of the
    same name (read from its environment where it is installed; skipped otherwise)."""
    import os

    from transformers import AutoTokenizer

    from evomerge.merging.chat import NAMED_TEMPLATES

    envs = [Path(__file__).parent.parent / ".venv-mergekit"]
    if os.environ.get("EVOMERGE_MERGEKIT_PYTHON"):
        envs.insert(0, Path(os.environ["EVOMERGE_MERGEKIT_PYTHON"]).parent.parent)
    pattern = f"lib/*/site-packages/mergekit/_data/chat_templates/{name}.jinja"
    found = [f for env in envs for f in sorted(env.glob(pattern))]
    if not found:
        pytest.skip("mergekit 0.1.5's environment is not installed")
    tokenizer = AutoTokenizer.from_pretrained(pool["base"])
    conversations = [
        [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "hello"}],
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
    ]
    for messages in conversations:
        for prompt in (False, True):
            theirs = tokenizer.apply_chat_template(
                messages,
                chat_template=found[0].read_text(),
                tokenize=False,
                add_generation_prompt=prompt,
            )
            ours = tokenizer.apply_chat_template(
                messages,
                chat_template=NAMED_TEMPLATES[name],
                tokenize=False,
                add_generation_prompt=prompt,
            )
            assert ours == theirs, (name, messages, prompt)


def test_named_chat_template_and_stop_tokens_are_written(pool, tmp_path):
    from transformers import AutoTokenizer

    out = _merge(
        tmp_path,
        """
merge_method: linear
base_model: $base
tokenizer_source: union
chat_template: chatml
models:
  - model: $base
    parameters: {weight: 0.5}
  - model: $chat
    parameters: {weight: 0.5}
""",
        pool,
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation = _json(out / "generation_config.json")
    assert generation["eos_token_id"] == [tokenizer.eos_token_id, end]  # </s> and <|im_end|>
    assert _json(out / "config.json")["eos_token_id"] == tokenizer.eos_token_id


def test_auto_template_is_the_most_common(pool, tmp_path):
    from helpers.vocab_models import CHATML

    out = _merge(
        tmp_path,
        """
merge_method: linear
tokenizer_source: union
chat_template: auto
models:
  - model: $base
    parameters: {weight: 0.2}
  - model: $chat
    parameters: {weight: 0.4}
  - model: $padded
    parameters: {weight: 0.4}
""",
        pool,
    )
    assert (out / "chat_template.jinja").read_text().strip() == CHATML.strip()  # 2 of 3


def test_a_fine_tune_that_changed_eos_keeps_its_stop_token(pool, tmp_path):
    """The output tokenizer is the fine-tune's (eos <|im_end|>); the config comes from the base
    (eos </s>): the written config and generation config name <|im_end|>."""
    from transformers import AutoTokenizer

    out = _merge(
        tmp_path,
        """
merge_method: linear
base_model: $base
tokenizer_source: $chat
models:
  - model: $base
    parameters: {weight: 0.5}
  - model: $chat
    parameters: {weight: 0.5}
""",
        pool,
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|im_end|>"
    assert _json(out / "config.json")["eos_token_id"] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id in [_json(out / "generation_config.json")["eos_token_id"]]


def test_template_without_alignment_replaces_the_copied_one(pool, tmp_path):
    from transformers import AutoTokenizer

    out = _merge(
        tmp_path,
        """
merge_method: linear
chat_template: llama3
models:
  - model: $base
    parameters: {weight: 0.5}
  - model: $unused
    parameters: {weight: 0.5}
""",
        pool,
    )
    from evomerge.merging.chat import NAMED_TEMPLATES

    assert AutoTokenizer.from_pretrained(out).chat_template == NAMED_TEMPLATES["llama3"]


def test_the_readmes_way_to_bring_a_fine_tune_to_the_pools_union(pool, tmp_path):
    """A search cannot align vocabularies; the README's workaround (each fine-tune at weight 1,
    the others at 0, `tokenizer_source: union`) gives the fine-tune itself on its own tokens."""
    from helpers.vocab_models import vocab_of

    out = _merge(
        tmp_path,
        """
merge_method: linear
base_model: $base
tokenizer_source: union
models:
  - model: $pad
    parameters: {weight: 1.0}
  - model: $chat
    parameters: {weight: 0.0}
  - model: $base
    parameters: {weight: 0.0}
""",
        pool,
    )
    merged, original = (
        load_file(out / "model.safetensors"),
        load_file(pool["pad"] / "model.safetensors"),
    )
    out_vocab, pad_vocab = vocab_of(out), vocab_of(pool["pad"])
    assert set(pad_vocab) < set(out_vocab) and "<|im_end|>" in out_vocab
    for name, tensor in original.items():
        if "embed_tokens" in name or "lm_head" in name:
            rows = [out_vocab[t] for t in pad_vocab]
            assert torch.equal(merged[name][rows], tensor[list(pad_vocab.values())]), name
        else:
            assert torch.equal(merged[name], tensor), name
