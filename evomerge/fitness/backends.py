"""Backends: what scores the live model, one object each, in one dict (`BACKENDS`).

A backend is three functions: `make_lm` wraps the live model as an lm-eval `LM`, once per run;
`prepare` builds every request of the tasks once for that LM; `sync` makes the LM score the
live model's current weights, after each change. "hf" wraps the in-memory transformers model
with lm-eval's `HFLM`, so tensors copied into the model's parameters are scored on the next call
with no reload (`sync` has nothing to do). "vllm" starts one vLLM engine over the model's folder
(a temporary copy of the live model where that is in another vocabulary than its folder) and
pushes the live model's weights into it in place (`evomerge.fitness.vllm_backend`).

A new backend is one `register_backend(...)` call (its heavy imports inside its functions:
reading a run config imports this module). `fitness.backend` in a run config is checked
against `BACKENDS`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evomerge.errors import UserError

if TYPE_CHECKING:
    from lm_eval.api.model import LM
    from lm_eval.api.task import Task

    from evomerge.fitness.prepared import PreparedRequests


@dataclass(frozen=True)
class Backend:
    """One way to score the live model.

    `make_lm(model, tokenizer, *, batch_size, max_length)`: an lm-eval LM over the live
    `model` that keeps a reference, never a copy. `prepare(lm, tasks, prompt=...)`: every request
    of `tasks` (name -> lm-eval Task), built once for that LM, prompts written as `prompt` (a
    `fitness.prepared.PromptFormat`: the chat template, a system instruction) says.
    `sync(lm)`: make `lm` score the live model's weights as they are now."""

    name: str
    make_lm: Callable[..., LM]
    prepare: Callable[..., PreparedRequests]
    sync: Callable[[LM], None]
    summary: str = ""


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    if backend.name in BACKENDS:
        raise ValueError(f"fitness backend {backend.name!r} is registered twice")
    BACKENDS[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    """The backend called `name`, or a `UserError` naming the closest one."""
    try:
        return BACKENDS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(BACKENDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(
            f"unknown fitness backend {name!r}{hint} (known: {', '.join(BACKENDS)})"
        ) from None


def make_lm(
    backend: str, model: Any, tokenizer: Any, *, batch_size: int, max_length: int | None
) -> LM:
    """An lm-eval LM over the live `model` by the backend called `backend`."""
    return get_backend(backend).make_lm(
        model, tokenizer, batch_size=batch_size, max_length=max_length
    )


# --- hf ------------------------------------------------------------------------------------
def _hf(model: Any, tokenizer: Any, *, batch_size: int, max_length: int | None) -> LM:
    from lm_eval.models.huggingface import HFLM

    model.eval()  # dropout off; the search copies tensors into this very module
    kwargs: dict[str, Any] = {"batch_size": batch_size}
    if max_length is not None:
        kwargs["max_length"] = max_length
    return HFLM(pretrained=model, tokenizer=tokenizer, **kwargs)


def _hf_requests(lm: LM, tasks: dict[str, Task], **options: Any) -> PreparedRequests:
    from evomerge.fitness.prepared import HFPreparedRequests

    return HFPreparedRequests(lm, tasks, **options)


def _scores_the_model_itself(lm: LM) -> None:
    """HFLM runs the live module: its weights are the ones scored, nothing to push."""


# --- vllm ----------------------------------------------------------------------------------
def _vllm(model: Any, tokenizer: Any, *, batch_size: int, max_length: int | None) -> LM:
    # vLLM is imported only here; the engine takes config and tokenizer from the model's folder
    # and its weights from the live model (batching is the engine's own: no batch_size)
    # A candidate then hands its merges to the engine, which runs them as it takes each tensor
    # (`vllm_backend.EngineMerge`): the model's own weights are freed, the engine's are the
    # live model.
    # A live model in another vocabulary than its folder's (an aligned pool, a chosen chat
    # template) starts the engine from a run-scoped copy of itself instead: the engine's
    # vocabulary, tokenizer and stop tokens are then the output's, as the hf backend's are.
    import shutil
    import weakref

    from evomerge.fitness.live_model import in_folder_vocabulary
    from evomerge.fitness.vllm_backend import (
        VLLMLiveLM,
        merge_for,
        start_engine,
        write_engine_folder,
    )
    from evomerge.io.dtypes import name_of

    copy = None
    if in_folder_vocabulary(model):
        if not getattr(model, "name_or_path", None):
            raise UserError(
                "fitness.backend 'vllm' needs a model loaded from a folder (from_pretrained)"
            )
        folder = str(model.name_or_path)
    else:
        copy = write_engine_folder(model, tokenizer)
        folder = str(copy)
    try:
        llm = start_engine(folder, dtype=name_of(model.dtype), max_model_len=max_length)
        lm = VLLMLiveLM(
            llm, tokenizer, staging=model, merge=merge_for(model), max_length=max_length
        )
    except BaseException:
        if copy is not None:
            shutil.rmtree(copy, ignore_errors=True)
        raise
    if copy is not None:  # kept while the engine lives (removed with it, or at exit)
        weakref.finalize(lm, shutil.rmtree, copy, ignore_errors=True)
    return lm


def _vllm_requests(lm: LM, tasks: dict[str, Task], **options: Any) -> PreparedRequests:
    from evomerge.fitness.vllm_backend import VLLMPreparedRequests

    return VLLMPreparedRequests(lm, tasks, **options)


def _push_into_engine(lm: LM) -> None:
    lm.sync_weights()


register_backend(
    Backend(
        "hf",
        _hf,
        _hf_requests,
        _scores_the_model_itself,
        summary="lm-eval's HFLM over the live transformers model",
    )
)
register_backend(
    Backend(
        "vllm",
        _vllm,
        _vllm_requests,
        _push_into_engine,
        summary="one vLLM engine per run, the live weights pushed into it after each change",
    )
)
