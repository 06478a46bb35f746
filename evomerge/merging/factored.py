"""LoRA adapters kept factored in a search, so a pool of adapters costs adapter-sized memory.

A search merges each output tensor once per trial from inputs read once (`CompiledCandidate`).
A full fine-tune's tensor stays resident, with what the kernel derives from it once per run
(task vectors, magnitude ranks, DARE's draw tables). An adapter (`base+adapter`) stands for
theta = W + s * B @ A; kept resident, that sum and its task vector would make a pool of
adapters cost as much as a pool of full models. So a job with an adapter among its models keeps
only each adapter's factors and the base tensor W (read once, and shared with the job's base
when they are the same tensor); per trial, W + s B A is formed exactly as `evomerge merge`
forms it (`LoraFactors.apply`, on the CPU, in the adapter's float32), the tensor is merged as
`evomerge merge` merges it (one-shot) and every full-size intermediate is freed with it.

What each method keeps per run in such a job, and what it forms per trial:
  - kept: W, the factors, each source's max |x| (found at compile time, while checking the
    sources are finite: it sizes DARE's exact L1 sums) and the other inputs' tensors;
  - task arithmetic, TIES, DARE (the fused kernel): tau = theta - base subtracted on the fly
    in the merge pass, never stored; TIES's top-k by a radix select per trial instead of
    stored magnitude ranks (int32 per element per source: twice a bfloat16 model); DARE's
    draws hashed inline, and its L1 rescale read from a draw table as in a resident merge
    (512 KiB per source and tensor of 2^20 elements or more: adapter-sized; built from the
    first trial's task vector, which is then freed), or summed in a pass for smaller tensors;
  - every other method (its torch code): its ranks and draws are recomputed per trial in the
    trial's `MergeInputs` and freed with it.
Results are bit for bit those of `evomerge merge` on the decoded recipe, since both run the
same one-shot path on the same tensors (tests/test_candidate.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from evomerge.io.adapters import AdapterCheckpoint, LoraFactors
from evomerge.merging.executor import (
    PreparedTensor,
    checked_peaks,
    inputs_from,
    job_refs,
    merge_dtype,
)
from evomerge.merging.plan import MergePlan, TensorJob

if TYPE_CHECKING:
    import torch


def has_adapter(plan: MergePlan, job: TensorJob) -> bool:
    """Whether one of the job's models (the base apart) is a `base+adapter` reference."""
    return any(isinstance(plan.checkpoints[ref.model], AdapterCheckpoint) for ref in job.inputs)


@dataclass(frozen=True)
class AdaptedTensor:
    """One adapter's version of a tensor: the base's `weight` plus its factors (None where
    the adapter leaves this tensor as it is)."""

    weight: torch.Tensor
    factors: LoraFactors | None

    def materialise(self) -> torch.Tensor:
        return self.weight if self.factors is None else self.factors.apply(self.weight)


Source = Union["torch.Tensor", AdaptedTensor]


class FactoredTensor:
    """One output tensor of a search whose models include adapters (see the module notes);
    it is used as `PreparedTensor` is: `run_into` once per trial."""

    def __init__(self, plan: MergePlan, job: TensorJob, *, seed: int, device: str = "cpu"):
        self.plan, self.job, self.seed, self.device = plan, job, seed, device
        refs = job_refs(job)
        self.sources = _read_sources(plan, job)
        tensors = [_materialise(source) for source in self.sources]
        self.dtype = merge_dtype(plan, [t.dtype for t in tensors])
        self.peaks = checked_peaks(refs, tensors, self.dtype)
        self.draw_tables: dict[int, torch.Tensor] = {}  # DARE's, built in the first trial
        # Every tensor but the adapters' sums is cast once here (a tensor shared by several
        # sources, once); the sums are formed per trial, on the CPU as `evomerge merge` forms them.
        cast: dict[int, torch.Tensor] = {}
        for index, source in enumerate(self.sources):
            if not (isinstance(source, AdaptedTensor) and source.factors is not None):
                tensor = _materialise(source)
                if id(tensor) not in cast:
                    cast[id(tensor)] = tensor.to(device=device, dtype=self.dtype)
                self.sources[index] = cast[id(tensor)]

    def inputs(self):
        """This trial's `MergeInputs`: every adapter's tensor formed from its factors."""
        tensors = [_materialise(source) for source in self.sources]
        return inputs_from(
            self.plan,
            self.job,
            tensors,
            self.peaks,
            dtype=self.dtype,
            seed=self.seed,
            device=self.device,
        )

    def run_into(self, kwargs: dict[str, Any], target: torch.Tensor) -> bool:
        """Merge into `target`, as `PreparedTensor.run_into`; the trial's inputs are freed after."""
        prepared = PreparedTensor(self.plan.method, self.inputs(), resident=False)
        if prepared.fused is not None:
            prepared.fused.keep_draw_tables(self.draw_tables)
        return prepared.run_into(kwargs, target)

    def resident_bytes(self) -> int:
        """Bytes this tensor keeps between trials (tensors shared between sources counted once)."""
        kept = {}
        for source in self.sources:
            parts = [source] if not isinstance(source, AdaptedTensor) else [source.weight]
            if isinstance(source, AdaptedTensor) and source.factors is not None:
                parts += [source.factors.a, source.factors.b]
            kept.update({part.data_ptr(): part.numel() * part.element_size() for part in parts})
        return sum(kept.values()) + sum(table.nbytes for table in self.draw_tables.values())


def _read_sources(plan: MergePlan, job: TensorJob) -> list[Source]:
    """Each input of the job (`job_refs` order): adapters as AdaptedTensor, the rest as read.
    Reads of the same base tensor are shared: every adapter of a base and the job's base
    hold one tensor."""
    read: dict[tuple, torch.Tensor] = {}

    def plain(checkpoint, name: str) -> torch.Tensor:
        key = (checkpoint.path.resolve(), name)
        if key not in read:
            base_read = (
                checkpoint.base_tensor
                if isinstance(checkpoint, AdapterCheckpoint)
                else checkpoint.tensor
            )
            read[key] = base_read(name)
        return read[key]

    sources: list[Source] = []
    for ref in job.inputs:
        checkpoint = plan.checkpoints[ref.model]
        if isinstance(checkpoint, AdapterCheckpoint):
            sources.append(
                AdaptedTensor(plain(checkpoint, ref.name), checkpoint.factors.get(ref.name))
            )
        else:
            sources.append(plain(checkpoint, ref.name))
    if job.base is not None:
        checkpoint = plan.checkpoints[job.base.model]
        adapted = isinstance(
            checkpoint, AdapterCheckpoint
        )  # an adapted base: one tensor, formed once
        sources.append(
            checkpoint.tensor(job.base.name) if adapted else plain(checkpoint, job.base.name)
        )
    return sources


def _materialise(source: Source) -> torch.Tensor:
    return source.materialise() if isinstance(source, AdaptedTensor) else source
