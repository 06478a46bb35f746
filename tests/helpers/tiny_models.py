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
    root: Path,
    *,
    dtype: torch.dtype = torch.float32,
    n_models: int = 3,
    seed: int = 0,
    architecture: str = "Llama",
    **overrides,
) -> dict[str, Path]:
    """Save `base` and `ft0..ft{n-1}` under `root`; returns name -> folder. `architecture` names
    a transformers family with Llama's tensor layout ("Llama", "Mistral", "Qwen2", ...)."""
    import transformers

    config_class = getattr(transformers, f"{architecture}Config")
    model_class = getattr(transformers, f"{architecture}ForCausalLM")

    generator = torch.Generator().manual_seed(seed)
    config = config_class(**{**TINY_CONFIG, **overrides})
    torch.manual_seed(seed)
    base = model_class(config).to(dtype)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    folders = {"base": Path(root) / "base"}
    base.save_pretrained(folders["base"], safe_serialization=True)
    for i in range(n_models):
        model = model_class(config).to(dtype)
        state = {}
        for name, tensor in base_state.items():
            noise = torch.randn(tensor.shape, generator=generator) * 0.02
            keep = torch.rand(tensor.shape, generator=generator) < 0.6
            state[name] = (tensor.float() + noise * keep).to(dtype)
        model.load_state_dict(state)
        folders[f"ft{i}"] = Path(root) / f"ft{i}"
        model.save_pretrained(folders[f"ft{i}"], safe_serialization=True)
    return folders


RANK = 4


def write_adapter(folder: Path, base: Path, *, dtype=torch.float32, seed=0, **config) -> Path:
    """A PEFT LoRA adapter (random factors) of the Llama at `base`: q, v and down projections
    and the embeddings."""
    import json

    from safetensors.torch import save_file

    from evomerge.io.checkpoint import Checkpoint

    generator = torch.Generator().manual_seed(seed)
    base_ckpt = Checkpoint(str(base))
    tensors = {}
    for name in base_ckpt.names:
        module = name.removesuffix(".weight")
        if module.endswith(("q_proj", "v_proj", "down_proj")):
            out_dim, in_dim = base_ckpt.shape(name)
            rank = config.get("rank_pattern", {}).get(module.split(".")[-1], RANK)
            a = torch.randn(rank, in_dim, generator=generator) * 0.1
            b = torch.randn(out_dim, rank, generator=generator) * 0.1
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(dtype)
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(dtype)
        elif module.endswith("embed_tokens"):
            vocab, dim = base_ckpt.shape(name)
            tensors[f"base_model.model.{module}.lora_embedding_A"] = (
                torch.randn(RANK, vocab, generator=generator) * 0.1
            ).to(dtype)
            tensors[f"base_model.model.{module}.lora_embedding_B"] = (
                torch.randn(dim, RANK, generator=generator) * 0.1
            ).to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    settings = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
        "base_model_name_or_path": str(base),
        "fan_in_fan_out": False,
        **config,
    }
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return folder
