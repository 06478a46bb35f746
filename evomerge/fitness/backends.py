"""Backends: wrap a live model as an lm-eval `LM`, once per run.

The seam is one function, `make_lm`. "hf" wraps the in-memory transformers model with lm-eval's
`HFLM`, so tensors copied into the model's parameters are scored on the next call with no
reload. A "vllm" backend (a live engine whose weights are swapped in place) plugs in here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evomerge.errors import UserError

if TYPE_CHECKING:
    from lm_eval.api.model import LM

BACKENDS = ("hf",)


def make_lm(
    backend: str, model: Any, tokenizer: Any, *, batch_size: int, max_length: int | None
) -> LM:
    """An lm-eval LM over the live `model`; it keeps a reference, never a copy."""
    if backend == "hf":
        return _hf(model, tokenizer, batch_size=batch_size, max_length=max_length)
    raise UserError(f"unknown fitness backend {backend!r}; choose one of {', '.join(BACKENDS)}.")


def _hf(model: Any, tokenizer: Any, *, batch_size: int, max_length: int | None) -> LM:
    from lm_eval.models.huggingface import HFLM

    model.eval()  # dropout off; the search copies tensors into this very module
    kwargs: dict[str, Any] = {"batch_size": batch_size}
    if max_length is not None:
        kwargs["max_length"] = max_length
    return HFLM(pretrained=model, tokenizer=tokenizer, **kwargs)
