"""The live model lm-eval scores: a model folder loaded once, in memory, to be scored as is
(`evomerge eval`) or overwritten in place by each candidate (the search)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evomerge.errors import UserError


def load_live_model(
    reference: str | Path,
    *,
    dtype: Any = "auto",
    device: str = "cpu",
    vocabulary: Path | None = None,
):
    """(model in eval mode, tokenizer) of a model folder, or of `base+adapter` (the base with a
    PEFT LoRA adapter merged in, as `merge` and `search` read it): safetensors only, never remote
    code.

    `vocabulary`: a folder with the config.json, generation_config.json and tokenizer files of
    another vocabulary (a search's merges over a pool whose vocabularies are aligned): the
    model's embedding and head get its `vocab_size` rows (values for the merge to write) and
    its token ids, and the tokenizer is read from there.

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
    if vocabulary is not None:
        _take_vocabulary(model, Path(vocabulary))
        _OTHER_VOCABULARY.add(model)
    model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(vocabulary or folder, trust_remote_code=False)
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


def _take_vocabulary(model: Any, folder: Path) -> None:
    """Resize the model's embedding (and head) to the `vocab_size` of `folder`'s config.json
    and take its token ids and generation config."""
    import json

    import torch
    from transformers import GenerationConfig

    config = json.loads((folder / "config.json").read_text())
    rows = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    with torch.random.fork_rng(devices=[]):  # new rows are initialised: leave no trace
        model.resize_token_embeddings(int(rows), mean_resizing=False)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in config:
            setattr(model.config, key, config[key])
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))


# --- a vocabulary other than the folder's ---------------------------------------------------
# A live model given another vocabulary (`load_live_model(vocabulary=...)`) no longer matches
# its folder: its embedding rows, token ids, stop tokens and tokenizer are the other's. A backend
# that reads the model from its folder (vLLM) must read it from a folder of its own instead.
_OTHER_VOCABULARY: weakref.WeakSet[Any] = weakref.WeakSet()


def in_folder_vocabulary(model: Any) -> bool:
    """Whether `model` has its folder's own vocabulary (False: `load_live_model` gave it another
    one, whose config, stop tokens and tokenizer its folder does not hold)."""
    return model not in _OTHER_VOCABULARY


# --- merges taken at push time -------------------------------------------------------------
# A live model whose weights live elsewhere (the vLLM backend's engine) takes each trial's
# merges itself instead of having the candidate write them into the model's tensors: the
# candidate hands over its jobs and their parameters (`CompiledCandidate.apply`), and the
# backend runs each merge when it pushes that tensor (`vllm_backend.EngineMerge`). Keyed by
# the model object, so that every candidate and evaluator of a run over it finds the same one.
_MERGE_AT_PUSH: weakref.WeakKeyDictionary[Any, Callable[..., None]] = weakref.WeakKeyDictionary()


def merge_at_push(model: Any) -> Callable[..., None] | None:
    """What takes `model`'s merges at push time, or None where the candidate writes them into
    the model itself: `take(candidate, runs)`, `runs` the `(job index, parameters)` pairs of
    one materialisation, each merged later by `candidate.run_into(index, parameters, out)`."""
    return _MERGE_AT_PUSH.get(model)


def set_merge_at_push(model: Any, take: Callable[..., None]) -> None:
    _MERGE_AT_PUSH[model] = take
