"""The live model lm-eval scores: a model folder loaded once, in memory, to be scored as is
(`evomerge eval`) or overwritten in place by each candidate (the search)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.errors import UserError


def load_live_model(reference: str | Path, *, dtype: Any = "auto", device: str = "cpu"):
    """(model in eval mode, tokenizer) of a model folder: safetensors only, never remote code.

    The folder is checked as every model evomerge reads is (`Checkpoint`: it exists, holds
    readable safetensors), so a bad folder is one sentence, not a transformers traceback.
    `dtype="auto"` keeps the checkpoint's own dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.io.checkpoint import Checkpoint

    folder = Checkpoint(str(reference)).path
    if not (folder / "config.json").is_file():
        raise UserError(f"{reference} is not a Hugging Face model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, use_safetensors=True, trust_remote_code=False
    )
    model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as exc:  # transformers' ways of saying "no usable tokenizer"
        raise UserError(
            f"cannot load the tokenizer of {reference}: {str(exc).splitlines()[0]}"
        ) from None
    return model, tokenizer
