"""Executing a merge plan: read the inputs of one tensor, merge, hand the result on.

`PreparedTensor` is the single place where a tensor's inputs and parameters become a tensor:
it runs the fused kernel where it takes the merge (the task-vector family, evomerge/kernel)
and the method's own torch code otherwise. The plain `evomerge merge` command streams its
output to disk (`merged_tensors`), and the search's candidates
(evomerge/spaces/parameters/candidate.py) call the same code, so that what was scored is what
ships.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge import __version__
from evomerge.errors import UserError
from evomerge.io.dtypes import torch_dtype
from evomerge.merging.plan import MergePlan, TensorJob, TensorRef, plan_merge
from evomerge.merging.recipe import Recipe
from evomerge.methods.registry import MergeInputs, MergeMethod

if TYPE_CHECKING:
    import torch

    from evomerge.io.output import TensorSpec

LOG = logging.getLogger(__name__)


def output_layout(plan: MergePlan, out_dtype: str | None = None) -> list[TensorSpec]:
    """Name, shape and dtype of every output tensor, from the input headers alone."""
    from evomerge.io.output import TensorSpec

    cast = torch_dtype(out_dtype or plan.recipe.out_dtype)
    layout = []
    for job in plan.jobs:
        refs = job_refs(job)
        ckpt = plan.checkpoints[refs[0].model]
        dtype = cast or merge_dtype(
            plan, [plan.checkpoints[r.model].torch_dtype(r.name) for r in refs]
        )
        shape = ckpt.shape(refs[0].name)
        if plan.is_aligned(job.out_name):  # one row per token of the output vocabulary
            shape = (plan.vocabulary.size, *shape[1:])
        layout.append(TensorSpec(job.out_name, shape, dtype))
    return layout


def merge_dtype(plan: MergePlan, dtypes: list[torch.dtype]) -> torch.dtype:
    """The recipe's `dtype`, else the promoted dtype of the inputs (as mergekit does)."""
    import torch

    dtype = torch_dtype(plan.recipe.dtype)
    if dtype is None:
        dtype = dtypes[0]
        for other in dtypes[1:]:
            dtype = torch.promote_types(dtype, other)
    return dtype


def load_inputs(plan: MergePlan, job: TensorJob, *, seed: int, device: str = "cpu") -> MergeInputs:
    """Read one job's tensors, check they are finite, cast to the merge dtype, on `device`."""
    return inputs_of(plan, job, read_tensors(plan, job_refs(job)), seed=seed, device=device)


def read_tensors(plan: MergePlan, refs: list[TensorRef]) -> list[torch.Tensor]:
    """The tensors of `refs`, each stored tensor read once: several `base+adapter` models of one
    base (and that base itself) share one read of the base's tensor, each adapter's update then
    applied to it (`LoraFactors.apply` makes a new tensor and leaves the base's as read)."""
    from evomerge.io.adapters import AdapterCheckpoint

    read: dict[tuple[Path, str], torch.Tensor] = {}
    tensors = []
    for ref in refs:
        checkpoint = plan.checkpoints[ref.model]
        adapter = isinstance(checkpoint, AdapterCheckpoint)
        key = (checkpoint.path.resolve(), ref.name)  # an adapter's path: its base's folder
        if key not in read:
            read[key] = checkpoint.base_tensor(ref.name) if adapter else checkpoint.tensor(ref.name)
        factors = checkpoint.factors.get(ref.name) if adapter else None
        tensors.append(read[key] if factors is None else factors.apply(read[key]))
    return tensors


def inputs_of(
    plan: MergePlan,
    job: TensorJob,
    tensors: list[torch.Tensor],
    *,
    seed: int,
    device: str = "cpu",
) -> MergeInputs:
    """One job's inputs from its tensors as read (in `job_refs` order; from files, or a staged
    search's in-memory stage outputs): checked finite, cast to the merge dtype, on `device`."""
    dtype = merge_dtype(plan, [t.dtype for t in tensors])
    peaks = checked_peaks(job_refs(job), tensors, dtype)
    if plan.is_aligned(job.out_name):  # rows re-laid out by token: the peaks no longer hold
        tensors = plan.vocabulary.align([r.model for r in job_refs(job)], tensors)
        peaks = [None] * len(tensors)
    return inputs_from(plan, job, tensors, peaks, dtype=dtype, seed=seed, device=device)


def job_refs(job: TensorJob) -> list[TensorRef]:
    """A job's input references, the base last."""
    return list(job.inputs) + ([job.base] if job.base else [])


def checked_peaks(
    refs: list[TensorRef], tensors: list[torch.Tensor], dtype: torch.dtype
) -> list[float | None]:
    """max |x| of each tensor, where it holds in the merge dtype `dtype` (a cast may round);
    a UserError where a tensor has a NaN or an Inf."""
    from evomerge.kernel.cpu import peak

    peaks = [peak(t) if t.is_floating_point() else None for t in tensors]
    for ref, value in zip(refs, peaks):
        if value is not None and not math.isfinite(value):
            raise UserError(
                f"model {ref.model!r} has NaN or Inf values in tensor {ref.name!r}; "
                "refusing to merge a broken checkpoint"
            )
    return [value if t.dtype == dtype else None for t, value in zip(tensors, peaks)]


def inputs_from(
    plan: MergePlan,
    job: TensorJob,
    tensors: list[torch.Tensor],
    peaks: list[float | None],
    *,
    dtype: torch.dtype,
    seed: int,
    device: str,
) -> MergeInputs:
    """The method's view of a job's tensors (read in `job_refs` order), cast to `dtype` on
    `device`."""
    from evomerge.methods.random_fields import UniformField

    tensors = [t.to(device=device, dtype=dtype) for t in tensors]
    base = tensors.pop() if job.base else None
    field = UniformField(seed, job.out_name) if plan.method.randomized else None
    read = plan.grams(job)
    grams = None
    if read is not None:  # read when the method asks, on the merge's device

        def grams():
            return [None if g is None else g.to(device=device) for g in read()]

    return MergeInputs(
        models=tensors, base=base, tensor_name=job.out_name, field=field, peaks=peaks, grams=grams
    )


class PreparedTensor:
    """One output tensor's inputs, read once, ready to be merged with any parameters.

    Lifecycle: prepare once (the inputs read, and where the fused kernel takes this merge, the
    kernel's state made for them), then `run` once per merge. `resident` says that it will be
    merged many times (the search, once per trial): the kernel then keeps what does not change
    between merges (task vectors, magnitude ranks, DARE's draw tables); a plain merge runs once
    and keeps nothing.
    """

    def __init__(self, method: MergeMethod, inputs: MergeInputs, *, resident: bool):
        from evomerge.kernel import task_vectors

        self.method, self.inputs = method, inputs
        self.fused = task_vectors.prepare(method, inputs, resident=resident)

    def run(
        self, kwargs: dict[str, Any], *, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, bool | None]:
        """The merged tensor (written into `out` where the kernel can write there) and whether
        it is finite, where the kernel found that in its pass (None where the method ran)."""
        import torch

        with torch.no_grad():
            try:
                if self.fused is not None:
                    return self.fused.merge(**kwargs, out=out)
                return self.method.merge(self.inputs, **kwargs), None
            except ValueError as exc:  # a method's refusal of these inputs, e.g. della bounds
                raise UserError(
                    f"{self.method.name} cannot merge {self.inputs.tensor_name!r}: {exc}"
                ) from None

    def run_into(self, kwargs: dict[str, Any], target: torch.Tensor) -> bool:
        """Merge into `target` (a live model's parameter); whether every value is finite, found
        in the kernel's pass or in the copy into `target`: never in a pass of its own."""
        from evomerge.kernel.cpu import copy_finite

        merged, finite = self.run(kwargs, out=target)
        if merged is not target:
            finite = copy_finite(merged, target)
        return finite


def merged_tensors(
    plan: MergePlan,
    *,
    seed: int,
    device: str = "cpu",
    out_dtype: str | None = None,
    destinations: Callable[[], torch.Tensor] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every output tensor, cast to `out_dtype` if given. `destinations()`
    offers a buffer for the next result (the fused kernel writes into it)."""
    cast = torch_dtype(out_dtype or plan.recipe.out_dtype)
    for job in plan.jobs:
        tensor = PreparedTensor(
            plan.method, load_inputs(plan, job, seed=seed, device=device), resident=False
        )
        out = (
            destinations()
            if destinations is not None and cast is None and device == "cpu"
            else None
        )
        result, _ = tensor.run(job.kwargs, out=out)
        yield job.out_name, result if cast is None else result.to(cast)


@dataclass
class MergeSummary:
    tensors: int
    bytes_written: int
    bytes_read: int
    seconds: float
    out_dir: Path


def run_merge(
    recipe: Recipe,
    out_dir: Path,
    *,
    seed: int = 0,
    device: str = "cpu",
    out_dtype: str | None = None,
    shard_bytes: int = 5_000_000_000,
    force: bool = False,
    allow_pickle: bool = False,
    progress: Callable[[int, int], None] | None = None,
    extra_files: dict[str, str] | None = None,
) -> MergeSummary:
    """Merge `recipe` into a Hugging Face model folder at `out_dir`, atomically.

    `extra_files` (name -> text) are written beside the model, e.g. a model card."""
    from evomerge.io.output import ShardedWriter, staged_output, write_config

    started = time.perf_counter()
    check_device(device)
    plan = plan_merge(recipe, allow_pickle=allow_pickle)
    final_dtype = out_dtype or recipe.out_dtype or recipe.dtype
    with staged_output(Path(out_dir), force=force) as staging:
        writer = ShardedWriter(staging, output_layout(plan, out_dtype), shard_bytes)
        for done, (name, tensor) in enumerate(
            merged_tensors(
                plan, seed=seed, device=device, out_dtype=out_dtype, destinations=writer.destination
            ),
            start=1,
        ):
            writer.add(name, tensor)
            if progress:
                progress(done, len(plan.jobs))
        writer.finish()
        source = plan.checkpoints[plan.config_source].path
        write_config(source, staging, layer_sources=plan.layer_sources(), dtype=final_dtype)
        write_tokenizer(plan, staging)
        (staging / "recipe.yaml").write_text(recipe.to_yaml())
        provenance = {"evomerge_version": __version__, "seed": seed, "out_dtype": final_dtype}
        (staging / "evomerge.json").write_text(json.dumps(provenance, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
    return MergeSummary(
        tensors=len(plan.jobs),
        bytes_written=writer.total_bytes,
        bytes_read=plan.input_bytes(),
        seconds=time.perf_counter() - started,
        out_dir=Path(out_dir),
    )


def write_tokenizer(plan: MergePlan, staging: Path) -> None:
    """The output's tokenizer, chat template, vocab_size and stop tokens (see
    evomerge/merging/chat.py)."""
    from evomerge.merging.chat import write_tokenizer_files

    write_tokenizer_files(plan, staging)


def check_device(device: str) -> None:
    """Refuse a device name the merge cannot use, before any work: `cpu`, `mps`, `cuda` or
    `cuda:N` (of a GPU torch sees)."""
    match = re.fullmatch(r"cpu|mps|cuda(?::(\d+))?", str(device))
    if match is None:
        raise UserError(f"device {device!r} is not one of cpu, cuda, cuda:N (e.g. cuda:0) or mps")
    if device in ("cpu", "mps"):  # mps: torch names it if it is missing
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU here")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise UserError(
            f"device {device!r} does not exist: torch sees {torch.cuda.device_count()} GPU(s), "
            "numbered from cuda:0"
        )
