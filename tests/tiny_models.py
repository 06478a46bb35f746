"""Tiny Llama checkpoints for tests: a random base and fine-tunes that differ from it the
way real fine-tunes do (small, partly sparse, partly conflicting updates)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_CONFIG = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def build_tiny_pool(
    root: Path, *, dtype: torch.dtype = torch.float32, n_models: int = 3, seed: int = 0, **overrides
) -> dict[str, Path]:
    """Save `base` and `ft0..ft{n-1}` under `root`; returns name -> folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    generator = torch.Generator().manual_seed(seed)
    config = LlamaConfig(**{**TINY_CONFIG, **overrides})
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config).to(dtype)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    folders = {"base": Path(root) / "base"}
    base.save_pretrained(folders["base"], safe_serialization=True)
    for i in range(n_models):
        model = LlamaForCausalLM(config).to(dtype)
        state = {}
        for name, tensor in base_state.items():
            noise = torch.randn(tensor.shape, generator=generator) * 0.02
            keep = torch.rand(tensor.shape, generator=generator) < 0.6
            state[name] = (tensor.float() + noise * keep).to(dtype)
        model.load_state_dict(state)
        folders[f"ft{i}"] = Path(root) / f"ft{i}"
        model.save_pretrained(folders[f"ft{i}"], safe_serialization=True)
    return folders
