"""Each pool model's input statistics, from the dev documents: what RegMean merges with.

RegMean (`evomerge.methods.regmean`) wants, for every linear layer of every model, the Gram
matrix of the inputs that layer sees *on that model's own data*. A pool names its models, not
which data each one was trained for, so the dev split says it: each task's documents go to
the model that predicts their answers best (lowest teacher-forced answer NLL, one forward pass
per model over dev), and each model's statistics are taken over the documents it owns (over
all of dev for a model that owns none). Documents are the teacher-forced sequences the
refinement trains on (`evomerge.fitness.teacher`): context and answer, padding left out.
Layers fed the same input share one matrix, stored once, as a float16 correlation with float32
scales (`evomerge.io.statistics`: for Llama-3-8B's shapes, 16.4 GB a model instead of 39.2 GB).

    files = write_statistics(model, examples, models, folder)   # model name -> .safetensors

The live model is borrowed: each source's weights are copied into it in turn, and the
base's (`restore`) after; nothing else is kept.

Where the pool's vocabularies are aligned (`pool.tokenizer_source`, `pool.tokenizer`), the live
model has the output vocabulary and the documents its token ids: each source runs with its
embedding and head laid out in the output rows as the merge lays them out (a token it lacks
gets the row the merge gives it there), on the very token ids the search scores. It is not
re-tokenized with its own tokenizer: its statistics are then of the inputs the merged model's
layers see, and no text is decoded and encoded again (not exact around special tokens). Its
token frequencies are kept over its own rows (a token it lacks counts 0 for it), like every
file, so that a merge lays them out by token again as it lays out the rows.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from evomerge.fitness.teacher import Example, batches
from evomerge.io.adapters import open_checkpoint
from evomerge.io.statistics import pack

if TYPE_CHECKING:
    from evomerge.merging.plan import MergePlan

LOG = logging.getLogger(__name__)

BATCH = 32


def load_weights(model: torch.nn.Module, reference: str, plan: MergePlan | None = None) -> None:
    """Copy every tensor of checkpoint `reference` into the parameter or buffer of that name;
    where `plan` aligns vocabularies, its embedding and head as the merge lays them out in the
    output vocabulary (`aligned_rows`)."""
    checkpoint = open_checkpoint(reference)
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    aligned = aligned_rows(plan, reference) if plan is not None else {}
    with torch.no_grad():
        for name in checkpoint.names:
            if name in state:
                state[name].copy_(aligned.get(name, checkpoint.tensor(name)))


def aligned_rows(plan: MergePlan, reference: str) -> dict[str, torch.Tensor]:
    """Model `reference`'s vocabulary tensors (name -> (size, width)) in the output rows of
    `plan`, as `evomerge merge` of the plan hands them to the method: the rows of tokens it
    lacks are the defaults the merge gives it there (`VocabularyAlignment.align`)."""
    from evomerge.merging.executor import job_refs, load_inputs

    rows = {}
    for job in plan.jobs:
        refs = job_refs(job)
        if not plan.is_aligned(job.out_name) or reference not in [r.model for r in refs]:
            continue
        inputs = load_inputs(plan, job, seed=0)
        tensors = [*inputs.models, *([inputs.base] if job.base else [])]  # job_refs order
        rows[job.out_name] = tensors[[r.model for r in refs].index(reference)]
    return rows


def answer_nll(model: torch.nn.Module, examples: list[Example]) -> dict[str, float]:
    """Per task, the mean teacher-forced answer NLL of `model` on `examples`."""
    per_task: dict[str, list[float]] = {}
    with torch.no_grad():
        for batch in batches(examples, BATCH):
            nll, _ = batch.scores(model(batch.inputs.to(_device(model))).logits.cpu())
            for example, value in zip(batch.examples, nll.tolist()):
                per_task.setdefault(example.task, []).append(value)
    return {task: sum(v) / len(v) for task, v in per_task.items()}


@dataclass
class Statistics:
    """One model's statistics (float32) as its file keeps them: `tensors` holds each distinct
    input once, under the first weight (in call order) that reads it; `same_input` names that
    weight for every other weight reading the same input (q/k/v_proj, gate/up_proj)."""

    tensors: dict[str, torch.Tensor]
    same_input: dict[str, str]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[self.same_input.get(name, name)]


class _Unshareable(Exception):
    """The layers' inputs are not shared the same way in every forward pass."""


def gram_matrices(model: torch.nn.Module, examples: list[Example]) -> Statistics:
    """The statistics RegMean reads, over the tokens of `examples` (padding left out): for
    every linear layer of `model`, X^T X / N of its inputs; for every embedding, each token's
    frequency (the diagonal of its Gram matrix over one-hot inputs).

    Layers that are handed the very same input tensor in a forward pass (HF Llama, Mistral and
    Qwen call q/k/v_proj on one `hidden_states`, gate/up_proj on one `x`) share one matrix: it
    is taken once and stored once. Sharing is decided by object identity (and the tensor's
    in-place version counter), not by module names or by comparing matrices, so it needs no
    knowledge of the architecture and is never wrong: two inputs that are different objects
    are kept apart even where equal (GPT-2's fused c_attn has nothing to share anyway). Where a
    layer is called more than once per pass, or sharing differs between passes, the matrices
    are taken again with none shared."""
    try:
        return _gram_matrices(model, examples, share=True)
    except _Unshareable:
        LOG.warning("RegMean statistics: layer inputs are not shared alike in every pass")
        return _gram_matrices(model, examples, share=False)


def _gram_matrices(model: torch.nn.Module, examples: list[Example], *, share: bool) -> Statistics:
    layers = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Embedding)
    }
    # Summed in float32 on the host (float64 would double the largest allocation of the
    # collection, one (in, in) matrix per distinct input of the whole model).
    sums: dict[str, torch.Tensor] = {}
    shared: dict[str, str] = {}  # layer -> the layer whose input it reads (set by pass one)
    seen: dict[int, tuple[weakref.ref, int, str]] = {}  # this pass: id -> (input, version, layer)
    calls: dict[str, int] = {}
    state = {"first": True}

    def hook(name: str) -> Callable:
        def accumulate(module, inputs, output) -> None:
            x = inputs[0]
            calls[name] = calls.get(name, 0) + 1
            if isinstance(module, torch.nn.Embedding):
                # (B, T) ids; GPT-2's position embedding is handed (1, T) positions
                tokens = x.detach().broadcast_to(state["tokens"].shape)[state["tokens"]].cpu()
                counts = torch.bincount(tokens, minlength=module.num_embeddings).float()
                sums[name] = sums.get(name, 0) + counts
                return
            if share:
                entry = seen.get(id(x))
                # a live weak reference to this very object: the id is not a reused one
                same = entry is not None and entry[0]() is x and entry[1] == x._version
                reader = entry[2] if same else None
                if state["first"] and reader is not None:
                    shared[name] = reader
                if shared.get(name) != reader:
                    raise _Unshareable
                if reader is not None:
                    return
                seen[id(x)] = (weakref.ref(x), x._version, name)
            rows = x.detach()[state["tokens"]].cpu().float()  # (N, in)
            if name not in sums:
                sums[name] = torch.zeros(module.in_features, module.in_features)
            sums[name].addmm_(rows.T, rows)

        return accumulate

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    count = 0
    try:
        with torch.no_grad():
            for batch in batches(examples, BATCH):
                lengths = torch.tensor([len(e.tokens) - 1 for e in batch.examples])
                width = batch.inputs.shape[1]
                state["tokens"] = (torch.arange(width)[None, :] < lengths[:, None]).to(
                    _device(model)
                )
                seen.clear()
                calls.clear()
                model(batch.inputs.to(_device(model)))
                reused = {name for name, n in calls.items() if n > 1}
                if reused & (set(shared) | set(shared.values())):
                    raise _Unshareable  # a layer's sum would hold more than the input it shares
                state["first"] = False
                count += int(lengths.sum())
    finally:
        seen.clear()
        for handle in handles:
            handle.remove()
    return Statistics(
        {f"{name}.weight": total / max(count, 1) for name, total in sums.items()},
        {f"{name}.weight": f"{reader}.weight" for name, reader in shared.items()},
    )


def owners(nll: dict[str, dict[str, float]]) -> dict[str, str]:
    """Task -> the model with the lowest answer NLL on it (`nll`: model -> task -> NLL)."""
    tasks = next(iter(nll.values()))
    return {task: min(nll, key=lambda model: nll[model][task]) for task in tasks}


def write_statistics(
    model: torch.nn.Module,
    examples: list[Example],
    models: dict[str, str],
    folder: Path,
    *,
    restore: str,
    plan: MergePlan | None = None,
) -> dict[str, Path]:
    """Write `folder/<name>.safetensors` for each of `models` (name -> reference) unless it is
    there already (a resumed run reuses them), and return name -> file. `restore`: the
    reference whose weights the live model holds again afterwards (the base).

    `plan`: where the pool's vocabularies are aligned, a merge plan of the search (the live
    model then has its output vocabulary, and `examples` its token ids). Each model runs with
    its embedding and head in the output rows, as the merge lays them out, on the documents
    the search scores; its per-row statistics are kept over its own rows (`own_rows`), as
    every file is, and a merge lays them out again as it lays out the rows."""
    files = {name: Path(folder) / f"{name}.safetensors" for name in models}
    todo = {name: ref for name, ref in models.items() if not files[name].is_file()}
    if not todo:
        return files
    started = time.perf_counter()
    nll = {}
    for name, reference in models.items():
        load_weights(model, reference, plan)
        nll[name] = answer_nll(model, examples)
    owner = owners(nll)
    LOG.info("RegMean statistics: each task's dev documents from %s", owner)
    for name, reference in todo.items():
        mine = [e for e in examples if owner[e.task] == name] or examples
        load_weights(model, reference, plan)
        collected = gram_matrices(model, mine)
        if plan is not None:
            collected = own_rows(collected, plan, reference)
        _save_atomic(*pack(collected.tensors, collected.same_input), files[name])
    load_weights(model, restore, plan)
    LOG.info(
        "RegMean statistics of %d models in %.1f s (%d forward passes over %d dev documents)",
        len(todo),
        time.perf_counter() - started,
        len(models) + len(todo),
        len(examples),
    )
    return files


def own_rows(collected: Statistics, plan: MergePlan, reference: str) -> Statistics:
    """`collected` (taken on the live model, in the output vocabulary of `plan`) with each
    embedding's per-row statistics moved back to `reference`'s own rows: its token
    frequencies; a head's Gram matrix is over the hidden state and stays as it is."""
    checkpoint = open_checkpoint(reference)
    tensors = dict(collected.tensors)
    for name, stats in collected.tensors.items():
        if stats.dim() == 1 and plan.is_aligned(name) and name in checkpoint.names:
            rows = checkpoint.shape(name)[0]
            tensors[name] = plan.vocabulary.own_statistics(reference, stats, rows)
    return Statistics(tensors, collected.same_input)


def _save_atomic(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, path: Path
) -> None:
    """Write `path` whole or not at all (workers starting together write the same bytes)."""
    from safetensors.torch import save_file

    from evomerge.io.output import follow_umask

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, scratch, metadata=metadata)
        follow_umask(Path(scratch))
        os.replace(scratch, path)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
