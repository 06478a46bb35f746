"""Backends: wrap a live model as an lm-eval `LM`, once per run.

The seam is one function, `make_lm`. "hf" wraps the in-memory transformers model with lm-eval's
`HFLM`, so tensors copied into the model's parameters are scored on the next call with no
reload. "vllm" starts one vLLM engine over the model's folder and pushes the live model's
weights into it in place (`evomerge.fitness.vllm_backend`); after changing the live model, call
`sync_weights(lm)` so the next score sees the change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evomerge.errors import UserError

if TYPE_CHECKING:
    from lm_eval.api.model import LM
    from lm_eval.api.task import Task

    from evomerge.fitness.prepared import PreparedRequests

BACKENDS = ("hf", "vllm")


def make_lm(
    backend: str, model: Any, tokenizer: Any, *, batch_size: int, max_length: int | None
) -> LM:
    """An lm-eval LM over the live `model`; it keeps a reference, never a copy."""
    if backend == "hf":
        return _hf(model, tokenizer, batch_size=batch_size, max_length=max_length)
    if backend == "vllm":
        return _vllm(model, tokenizer, max_length=max_length)
    raise UserError(f"unknown fitness backend {backend!r}; choose one of {', '.join(BACKENDS)}.")


def prepare_requests(backend: str, lm: LM, tasks: dict[str, Task]) -> PreparedRequests:
    """Every request of `tasks`, built once for `lm` (made by `make_lm(backend, ...)`)."""
    if backend == "hf":
        from evomerge.fitness.prepared import HFPreparedRequests

        return HFPreparedRequests(lm, tasks)
    from evomerge.fitness.vllm_backend import VLLMPreparedRequests

    return VLLMPreparedRequests(lm, tasks)


def sync_weights(lm: LM) -> None:
    """Make `lm` score the live model's current weights: "hf" scores the model object itself
    (nothing to do); "vllm" pushes them into its engine."""
    push = getattr(lm, "sync_weights", None)
    if push is not None:
        push()


def _hf(model: Any, tokenizer: Any, *, batch_size: int, max_length: int | None) -> LM:
    from lm_eval.models.huggingface import HFLM

    model.eval()  # dropout off; the search copies tensors into this very module
    kwargs: dict[str, Any] = {"batch_size": batch_size}
    if max_length is not None:
        kwargs["max_length"] = max_length
    return HFLM(pretrained=model, tokenizer=tokenizer, **kwargs)


def _vllm(model: Any, tokenizer: Any, *, max_length: int | None) -> LM:
    # vLLM is imported only here; the engine takes config and tokenizer from the model's folder
    # and its weights from the live model (batching is the engine's own: no batch_size)
    from evomerge.fitness.vllm_backend import VLLMLiveLM, start_engine, torch_dtype_name

    if not getattr(model, "name_or_path", None):
        raise UserError(
            "fitness.backend 'vllm' needs a model loaded from a folder (from_pretrained)"
        )
    llm = start_engine(
        model.name_or_path, dtype=torch_dtype_name(model.dtype), max_model_len=max_length
    )
    return VLLMLiveLM(llm, tokenizer, staging=model, max_length=max_length)
