"""`evomerge check RECIPE|CONFIG`: the pre-flight check, from headers and configs only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from evomerge.cli import cli


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from helpers.vocab_models import build_vocab_pool

    return build_vocab_pool(tmp_path_factory.mktemp("vocab"))


def _check(tmp_path: Path, text: str, pool: dict, name: str = "recipe.yaml"):
    from helpers.mergekit_env import fill_in_paths

    file = tmp_path / name
    file.write_text(fill_in_paths(text, pool))
    result = CliRunner().invoke(cli, ["check", str(file)])
    lines = result.output.strip().splitlines()
    return result.exit_code, lines


def _lines(lines: list[str], level: str, topic: str) -> list[str]:
    return [line for line in lines if line.split()[:2] == [level, f"{topic}:"]]


def test_help_answers_without_torch():
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom evomerge.cli import cli\n"
        "r = CliRunner().invoke(cli, ['check', '--help'])\nassert r.exit_code == 0, r.output\n"
        "assert 'RECIPE|CONFIG' in r.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_union_merge_reports_its_alignment_and_stop_tokens(pool, tmp_path):
    code, lines = _check(
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
  - model: $padded
    parameters: {weight: 0.5}
""",
        pool,
    )
    assert code == 0, lines
    assert len(_lines(lines, "INFO", "source")) == 3
    assert _lines(lines, "OK", "architecture") and _lines(lines, "OK", "shapes")
    assert any("aligned by token to `union`: 39 tokens" in x for x in lines)
    assert any("padded beyond the tokenizer" in x for x in _lines(lines, "INFO", "vocabulary"))
    assert any("lacks 2 of them" in x for x in lines)
    assert any("'</s>', '<|im_end|>'" in x for x in _lines(lines, "OK", "stop"))
    assert any("end sequences differently" in x for x in _lines(lines, "WARN", "stop")), lines
    assert any("num_hidden_layers" in x for x in _lines(lines, "OK", "layers"))
    assert any("F32" in x for x in _lines(lines, "INFO", "dtype"))
    assert lines[-1].endswith("nothing blocks")


def test_differing_vocabularies_without_a_source_block(pool, tmp_path):
    code, lines = _check(
        tmp_path,
        "merge_method: linear\nmodels: [{model: $base, parameters: {weight: 1}}, "
        "{model: $pad, parameters: {weight: 1}}]\n",
        pool,
    )
    assert code == 2
    blocks = [x for x in lines if x.startswith("BLOCK")]
    assert len(blocks) == 1 and "tokenizer_source: union" in blocks[0]


def test_a_token_beyond_the_rows_and_a_template_the_vocabulary_cannot_end(pool, tmp_path):
    code, lines = _check(
        tmp_path,
        """
merge_method: linear
tokenizer_source: base
chat_template: llama3
models:
  - model: $unused
    parameters: {weight: 1}
  - model: $pad
    parameters: {weight: 1}
""",
        pool,
    )
    assert code == 0, lines
    assert any("beyond its 37 rows ('<pad>')" in x for x in _lines(lines, "WARN", "vocabulary"))
    assert any("'<|eot_id|>', which its vocabulary lacks" in x for x in lines)


def test_a_missing_model_and_a_bad_layer_range_block(pool, tmp_path):
    code, lines = _check(tmp_path, "merge_method: linear\nmodels: [{model: /nope/x}]\n", pool)
    assert code == 2 and any("is not a local folder" in x for x in lines)
    code, lines = _check(
        tmp_path,
        "merge_method: passthrough\nslices:\n  - sources: [{model: $base, layer_range: [0, 9]}]\n",
        pool,
    )
    assert code == 2 and any(x.startswith("BLOCK plan:") and "2 layers" in x for x in lines)


def test_tied_embeddings_and_adapters_are_reported(tmp_path):
    import torch
    from helpers.tiny_models import build_tiny_pool, write_adapter

    folders = build_tiny_pool(tmp_path / "pool", n_models=1, tie_word_embeddings=True)
    adapter = write_adapter(tmp_path / "adapter", folders["base"], dtype=torch.bfloat16)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {folders['base']}\nmodels:\n"
        f"  - model: {folders['ft0']}\n    parameters: {{weight: 1}}\n"
        f"  - model: {folders['base']}+{adapter}\n    parameters: {{weight: 1}}\n"
    )
    result = CliRunner().invoke(cli, ["check", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "OK    embeddings: tied in every source" in result.output
    assert f"LoRA r=4 on q_proj, v_proj, down_proj, embed_tokens; trained on {folders['base']}" in (
        result.output
    )


def test_a_search_pool_whose_fine_tunes_added_tokens_is_refused(pool, tmp_path):
    from evomerge.errors import UserError
    from evomerge.search.config import load_run_config

    text = (
        "pool:\n  base: $base\n  models: [$chat, $pad]\n"
        "space: {method: linear, search: {weight: null}}\nfitness: {tasks: [x]}\n"
    )
    code, lines = _check(tmp_path, text, pool, name="search.yaml")
    assert code == 2
    assert lines[0].startswith("BLOCK config:") and "pool.tokenizer_source: union" in lines[0]
    assert len(_lines(lines, "INFO", "source")) == 3
    with pytest.raises(UserError, match=r"vocabularies \(.*\); set `pool.tokenizer_source"):
        load_run_config(tmp_path / "search.yaml")

    # with a vocabulary source the pool is aligned as a merge aligns it: nothing blocks
    aligned = text.replace("  models:", "  tokenizer_source: union\n  models:")
    code, lines = _check(tmp_path, aligned, pool, name="search.yaml")
    assert code == 0, lines
    assert any(x.startswith("INFO  vocabulary: aligned by token to `union`") for x in lines)
    load_run_config(tmp_path / "search.yaml")


def test_the_layer_keys_of_the_output_are_named(tmp_path):
    from helpers.tiny_models import build_tiny_pool

    folders = build_tiny_pool(tmp_path / "pool", n_models=1)
    config = json.loads((folders["base"] / "config.json").read_text())
    assert "num_hidden_layers" in config
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "merge_method: passthrough\nslices:\n"
        f"  - sources: [{{model: {folders['base']}, layer_range: [0, 3]}}]\n"
        f"  - sources: [{{model: {folders['ft0']}, layer_range: [1, 4]}}]\n"
    )
    result = CliRunner().invoke(cli, ["check", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "the output has 6 layers; config.json key(s) set: num_hidden_layers" in result.output


def test_a_multi_stage_recipe_is_checked_stage_by_stage(pool, tmp_path):
    code, lines = _check(
        tmp_path,
        """
name: first
merge_method: linear
tokenizer_source: union
models:
  - model: $base
    parameters: {weight: 0.5}
  - model: $chat
    parameters: {weight: 0.5}
---
merge_method: slerp
base_model: first
parameters: {t: 0.5}
models:
  - model: first
  - model: $chat
""",
        pool,
    )
    assert code == 0, lines
    assert any(x.startswith("INFO  [first] vocabulary: aligned by token") for x in lines)
    assert any(x.startswith("INFO  [final] stage: reads an earlier stage's output") for x in lines)


def test_a_search_pool_chat_template_is_checked_as_a_merge_checks_it(pool, tmp_path):
    text = (
        "pool:\n  base: $base\n  models: [$unused, $pad]\n  tokenizer_source: base\n"
        "  chat_template: llama3\n"
        "space: {method: linear, search: {weight: null}}\nfitness: {tasks: [x]}\n"
    )
    code, lines = _check(tmp_path, text, pool, name="search.yaml")
    assert code == 0, lines
    assert any("'<|eot_id|>', which its vocabulary lacks" in x for x in lines), lines
