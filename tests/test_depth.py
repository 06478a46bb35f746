"""A merge that changes the depth (passthrough stacking) writes a config of that depth, whatever
key the architecture keeps its layer count under, and re-lays out per-layer config lists.

The check is transformers itself: the merged folder loads with no unused and no missing
tensor, and builds as many layers as the merge wrote. (mergekit 0.1.5 writes the right depth
for GPT-2; before this, evomerge left `n_layer` alone and transformers dropped the extra
layers without a word.)
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml

SMALL = {"vocab_size": 64}
ARCHITECTURES = {
    # name: (config class, model class, config kwargs, layer-count key)
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 32, "n_head": 2, "n_layer": 2}, "n_layer"),
    "gptj": (
        "GPTJConfig",
        "GPTJForCausalLM",
        {"n_embd": 32, "n_head": 2, "n_layer": 2, "rotary_dim": 8},
        "n_layer",
    ),
    "bloom": (
        "BloomConfig",
        "BloomForCausalLM",
        {"hidden_size": 32, "n_head": 2, "n_layer": 2},
        "n_layer",
    ),
    "gpt_neo": (
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        {
            "hidden_size": 32,
            "num_heads": 2,
            "num_layers": 2,
            "attention_types": [[["global", "local"], 1]],
            "window_size": 8,
        },
        "num_layers",
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {
            "hidden_size": 32,
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "intermediate_size": 64,
        },
        "num_hidden_layers",
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "num_hidden_layers": 2,
            "use_sliding_window": True,
            "sliding_window": 16,
            "layer_types": ["full_attention", "sliding_attention"],
        },
        "num_hidden_layers",
    ),
    "phi": (
        "PhiConfig",
        "PhiForCausalLM",
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
        },
        "num_hidden_layers",
    ),
}


def build(name: str, folder):
    import transformers

    config_class, model_class, kwargs, _ = ARCHITECTURES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**SMALL, **kwargs)
    getattr(transformers, model_class)(config).save_pretrained(folder)
    return folder


def stack(monkeypatch, capsys, model, out, ranges) -> None:
    from evomerge.cli import main

    recipe = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(model), "layer_range": r}]} for r in ranges],
    }
    file = out.parent / f"{out.name}.yaml"
    file.write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(sys, "argv", ["evomerge", "merge", str(file), str(out)])
    try:
        main()
    except SystemExit as exc:
        assert exc.code == 0, capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_a_stacked_model_has_the_depth_its_tensors_have(monkeypatch, capsys, tmp_path, name):
    import transformers

    torch.set_num_threads(1)
    source = build(name, tmp_path / "source")
    out = tmp_path / "stacked"
    stack(monkeypatch, capsys, source, out, [[0, 2], [1, 2], [0, 1]])  # layers 0 1 1 0
    config = json.loads((out / "config.json").read_text())
    assert config[ARCHITECTURES[name][3]] == 4
    if name == "gpt_neo":  # the run-length form agrees with the per-layer list
        assert config["attention_types"] == [
            [["global"], 1],
            [["local"], 1],
            [["local"], 1],
            [["global"], 1],
        ]
    model, info = getattr(transformers, ARCHITECTURES[name][1]).from_pretrained(
        out, output_loading_info=True
    )
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    original = getattr(transformers, ARCHITECTURES[name][1]).from_pretrained(source)
    stacked_layers = dict(model.named_parameters())
    for out_layer, src_layer in enumerate([0, 1, 1, 0]):  # each layer is its source's copy
        for key, value in original.named_parameters():
            marker = f".{src_layer}."
            if marker in key and key.split(marker)[0].endswith(("h", "layers", "blocks")):
                twin = key.replace(marker, f".{out_layer}.", 1)
                assert torch.equal(stacked_layers[twin], value), twin


def test_per_layer_config_lists_follow_their_layers(monkeypatch, capsys, tmp_path):
    """Qwen2's `layer_types`: each output layer keeps the attention kind of its source layer."""
    source = build("qwen2", tmp_path / "source")
    out = tmp_path / "stacked"
    stack(monkeypatch, capsys, source, out, [[1, 2], [0, 2], [1, 2]])  # layers 1 0 1 1
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"] == [
        "sliding_attention",
        "full_attention",
        "sliding_attention",
        "sliding_attention",
    ]
