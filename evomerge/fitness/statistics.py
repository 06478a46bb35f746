"""Each pool model's input statistics, from the dev documents: what RegMean merges with.

RegMean (`evomerge.methods.regmean`) wants, for every linear layer of every model, the Gram
matrix of the inputs that layer sees *on that model's own data*. A pool names its models, not
which data each one was trained for, so the dev split says it: each task's documents go to
the model that predicts their answers best (lowest teacher-forced answer NLL, one forward pass
per model over dev), and each model's statistics are taken over the documents it owns (over
all of dev for a model that owns none). Documents are the teacher-forced sequences the
refinement trains on (`evomerge.fitness.teacher`): context and answer, padding left out.

    files = write_statistics(model, examples, models, folder)   # model name -> .safetensors

The live model is borrowed: each source's weights are copied into it in turn, and the
base's (`restore`) after; nothing else is kept.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from evomerge.fitness.teacher import Example, batches
from evomerge.io.adapters import open_checkpoint

LOG = logging.getLogger(__name__)

BATCH = 32


def load_weights(model: torch.nn.Module, reference: str) -> None:
    """Copy every tensor of checkpoint `reference` into the parameter or buffer of that name."""
    checkpoint = open_checkpoint(reference)
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    with torch.no_grad():
        for name in checkpoint.names:
            if name in state:
                state[name].copy_(checkpoint.tensor(name))


def answer_nll(model: torch.nn.Module, examples: list[Example]) -> dict[str, float]:
    """Per task, the mean teacher-forced answer NLL of `model` on `examples`."""
    per_task: dict[str, list[float]] = {}
    with torch.no_grad():
        for batch in batches(examples, BATCH):
            nll, _ = batch.scores(model(batch.inputs.to(_device(model))).logits.cpu())
            for example, value in zip(batch.examples, nll.tolist()):
                per_task.setdefault(example.task, []).append(value)
    return {task: sum(v) / len(v) for task, v in per_task.items()}


def gram_matrices(model: torch.nn.Module, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Weight name -> the statistics RegMean reads (float32), over the tokens of `examples`
    (padding left out): for every linear layer of `model`, X^T X / N of its inputs; for every
    embedding, each token's frequency (the diagonal of its Gram matrix over one-hot inputs)."""
    layers = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Embedding)
    }
    sums = {
        n: torch.zeros(m.in_features, m.in_features)
        if isinstance(m, torch.nn.Linear)
        else torch.zeros(m.num_embeddings)
        for n, m in layers.items()
    }
    keep: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def accumulate(module, inputs, output) -> None:
            x = inputs[0].detach()[keep["tokens"]].cpu()
            if isinstance(module, torch.nn.Embedding):
                sums[name] += torch.bincount(x, minlength=module.num_embeddings).float()
            else:
                sums[name].addmm_(x.T.float(), x.float())

        return accumulate

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    count = 0
    try:
        with torch.no_grad():
            for batch in batches(examples, BATCH):
                lengths = torch.tensor([len(e.tokens) - 1 for e in batch.examples])
                width = batch.inputs.shape[1]
                keep["tokens"] = (torch.arange(width)[None, :] < lengths[:, None]).to(
                    _device(model)
                )
                model(batch.inputs.to(_device(model)))
                count += int(lengths.sum())
    finally:
        for handle in handles:
            handle.remove()
    return {f"{name}.weight": total / max(count, 1) for name, total in sums.items()}


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
) -> dict[str, Path]:
    """Write `folder/<name>.safetensors` for each of `models` (name -> reference) unless it is
    there already (a resumed run reuses them), and return name -> file. `restore`: the
    reference whose weights the live model holds again afterwards (the base)."""
    files = {name: Path(folder) / f"{name}.safetensors" for name in models}
    todo = {name: ref for name, ref in models.items() if not files[name].is_file()}
    if not todo:
        return files
    started = time.perf_counter()
    nll = {}
    for name, reference in models.items():
        load_weights(model, reference)
        nll[name] = answer_nll(model, examples)
    owner = owners(nll)
    LOG.info("RegMean statistics: each task's dev documents from %s", owner)
    for name, reference in todo.items():
        mine = [e for e in examples if owner[e.task] == name] or examples
        load_weights(model, reference)
        _save_atomic(gram_matrices(model, mine), files[name])
    load_weights(model, restore)
    LOG.info(
        "RegMean statistics of %d models in %.1f s (%d forward passes over %d dev documents)",
        len(todo),
        time.perf_counter() - started,
        len(models) + len(todo),
        len(examples),
    )
    return files


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write `path` whole or not at all (workers starting together write the same bytes)."""
    from safetensors.torch import save_file

    from evomerge.io.output import follow_umask

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, scratch)
        follow_umask(Path(scratch))
        os.replace(scratch, path)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
