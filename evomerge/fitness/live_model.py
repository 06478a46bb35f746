"""The live model lm-eval scores: a model folder loaded once, in memory, to be scored as is
(`evomerge eval`) or overwritten in place by each candidate (the search)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.errors import UserError


def load_live_model(reference: str | Path, *, dtype: Any = "auto", device: str = "cpu"):
    """(model in eval mode, tokenizer) of a model folder, or of `base+adapter` (the base with a
    PEFT LoRA adapter merged in, as `merge` and `search` read it): safetensors only, never remote
    code.

    The folder is checked as every model evomerge reads is (`Checkpoint`: it exists, holds
    readable safetensors), so a bad folder is one sentence, not a transformers traceback.
    `dtype="auto"` keeps the checkpoint's own dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.io.adapters import AdapterCheckpoint, open_checkpoint

    checkpoint = open_checkpoint(str(reference))  # a folder, or BASE+ADAPTER
    folder = checkpoint.path
    if not (folder / "config.json").is_file():
        raise UserError(f"{reference} is not a Hugging Face model folder (no config.json)")
    _ = checkpoint.num_layers  # reads and checks config.json: one sentence, not a traceback
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, use_safetensors=True, trust_remote_code=False
        )
    except (OSError, ValueError, TypeError) as exc:  # e.g. no or an unknown model_type
        raise UserError(
            f"transformers cannot load {reference} as a causal language model: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    if isinstance(checkpoint, AdapterCheckpoint):
        _apply_adapter(model, checkpoint)
    model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as exc:  # transformers' ways of saying "no usable tokenizer"
        raise UserError(
            f"cannot load the tokenizer of {reference}: {str(exc).splitlines()[0]}"
        ) from None
    return model, tokenizer


def _apply_adapter(model: Any, checkpoint: Any) -> None:
    """Write base + adapter into the loaded base model's tensors that the adapter changes (the
    numbers of PEFT's `merge_and_unload`, as `AdapterCheckpoint` computes them)."""
    import torch

    params = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name in checkpoint.factors:
            if name not in params:
                raise UserError(
                    f"adapter {str(checkpoint.adapter_path)!r} changes {name!r}, which the "
                    "loaded base model does not have"
                )
            params[name].copy_(checkpoint.tensor(name).to(params[name].dtype))
