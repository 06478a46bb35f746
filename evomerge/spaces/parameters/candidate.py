"""Merge candidates compiled once per run, materialised straight into a live model.

Compile (once per run): lay the search space out against the pool as a plan of tensor jobs
(`evomerge.merging.plan`, the same layout and parameter precedence as `evomerge merge`), note which
gene fills which parameter slot of which job, read every source tensor onto the device in the
merge dtype and prepare it for repeated merges (`evomerge.merging.executor.PreparedTensor`,
resident; LoRA adapters stay factored, `evomerge.merging.factored`).
Per trial (`apply(genome)`): write the genes into the slots and run the jobs; each result lands
in the evaluation model's parameter in place, its finiteness checked in the same pass.

Tiers (`search.tier`, chosen by the memory plan, evomerge/search/memory_plan.py): `device` keeps
the prepared inputs on the merge device; `host` keeps them in host memory and streams each
tensor's operands through one staging buffer on the device into the fused kernel
(`evomerge.kernel.task_vectors.Staging`), the next tensor's copy beside this one's merge on a
GPU; a job the kernel does not take is merged on the host and its result pushed. The numbers
are the same bit for bit in either tier (tests/test_tiers.py).

A genome decodes to an ordinary recipe (`SearchSpace.recipe`, for export); the compiled jobs
are that recipe's plan with the genome's values in it, run through the same executor, so the
exported model is bit for bit the one that was scored.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evomerge.errors import CandidateError, UserError
from evomerge.fitness.live_model import merge_at_push
from evomerge.merging.executor import PreparedTensor, load_inputs
from evomerge.merging.factored import FactoredTensor, has_adapter
from evomerge.merging.plan import MergePlan, TensorJob, plan_merge

if TYPE_CHECKING:
    import torch

    from evomerge.spaces.parameters.space import SearchSpace


@dataclass(frozen=True)
class Slot:
    """Where one gene's value goes in a job's keyword arguments: `kwarg`, or element `model`
    of it for a per-model parameter."""

    gene: str
    kwarg: str
    model: int | None = None


@dataclass
class CompiledJob:
    """One output tensor: its prepared inputs, the parameters that are the same in every trial
    (`fixed`), the slots the genome fills, and the live parameter the result goes into."""

    name: str
    tensor: PreparedTensor | FactoredTensor
    fixed: dict[str, Any]
    slots: list[Slot]
    target: torch.Tensor

    def parameters(self, genome: dict[str, float]) -> dict[str, Any]:
        kwargs = {
            key: list(value) if isinstance(value, list) else value
            for key, value in self.fixed.items()
        }
        for slot in self.slots:
            value = float(genome[slot.gene])  # as the recipe's parameter reader coerces it
            if slot.model is None:
                kwargs[slot.kwarg] = value
            else:
                kwargs[slot.kwarg][slot.model] = value
        return kwargs


class CompiledCandidate:
    """The candidates of `space`, compiled against its pool, written into `model` in place."""

    def __init__(
        self,
        model: torch.nn.Module,
        space: SearchSpace,
        *,
        seed: int,
        device: str = "cpu",
        tier: str = "device",
    ):
        if tier not in TIERS:
            raise UserError(f"tier {tier!r} is not one of {', '.join(TIERS)}")
        self.genes = [gene.name for gene in space.genes]
        plan, slots = compile_slots(space)
        state = dict(model.named_parameters())
        state.update(dict(model.named_buffers()))
        missing = [job.out_name for job in plan.jobs if job.out_name not in state]
        if missing:
            raise ValueError(f"the evaluation model has no parameters {missing[:3]}")
        self.jobs = [
            CompiledJob(
                name=job.out_name,
                tensor=resident_tensor(plan, job, seed=seed, device=device, tier=tier),
                fixed=job.kwargs,
                slots=slots[job.out_name],
                target=state[job.out_name],
            )
            for job in plan.jobs
        ]
        self.targets = {job.name: job.target for job in self.jobs}
        self.model = model
        self.tier, self.staging = tier, None
        streamed = [fused for job in self.jobs if getattr(fused := _fused(job), "streamed", 0)]
        if streamed:
            from evomerge.kernel.task_vectors import Staging

            self.staging = Staging(device, streamed)

    def apply(self, genome: dict[str, float], *, only: set[str] | None = None) -> None:
        """Materialise `genome` into the live model (`only`: just these tensors); CandidateError
        where a merged tensor has a NaN or an Inf."""
        missing = [name for name in self.genes if name not in genome]
        if missing:
            raise UserError(f"the genome lacks genes {missing[:3]}; was the search space changed?")
        take = merge_at_push(self.model)
        if take is not None:  # vLLM: each tensor is merged (`run_into`) as the engine takes it
            wanted = [i for i, job in enumerate(self.jobs) if only is None or job.name in only]
            take(self, [(i, self.jobs[i].parameters(genome)) for i in wanted])
            return
        for index, job in enumerate(self.jobs):
            if only is not None and job.name not in only:
                continue
            if self.staging is not None:
                self._prefetch(index, only)
            if not job.tensor.run_into(job.parameters(genome), job.target):
                raise CandidateError(f"the merged tensor {job.name!r} has NaN or Inf values")

    def run_into(self, index: int, parameters: dict[str, Any], out: torch.Tensor) -> bool:
        """Job `index` merged into `out` rather than into its target, for a live model that
        takes the merges at push time (`fitness.live_model.merge_at_push`), which runs every
        job in job order; whether every value is finite."""
        if self.staging is not None:
            self._prefetch(index, None)
        return self.jobs[index].tensor.run_into(parameters, out)

    def _prefetch(self, index: int, only: set[str] | None) -> None:
        """Host tier: make sure job `index`'s operands are being copied, and start the next
        job's copy so that it overlaps this merge (a GPU; the two never share a place)."""
        stage = getattr(_fused(self.jobs[index]), "stage", None)
        if stage is None:
            return
        stage.fetch()
        following = self.jobs[index + 1] if index + 1 < len(self.jobs) else None
        if following is not None and (only is None or following.name in only):
            after = getattr(_fused(following), "stage", None)
            if after is not None:
                after.prefetch()


TIERS = ("device", "host")


def _fused(job: CompiledJob):
    """The job's fused-kernel state, if the kernel merges it from resident inputs."""
    return getattr(job.tensor, "fused", None) if isinstance(job.tensor, PreparedTensor) else None


def resident_tensor(
    plan: MergePlan, job: TensorJob, *, seed: int, device: str, tier: str = "device"
) -> PreparedTensor | FactoredTensor:
    """One job read once for a run of merges: resident inputs, or, where its models include
    LoRA adapters, the adapters kept factored (evomerge/merging/factored.py); an embedding or
    head whose rows are re-laid out by token (aligned vocabularies) is read as `evomerge merge`
    reads it. In the host tier the inputs are read into host memory: the fused kernel then
    merges them on `device` from the staging buffer, and anything else merges on the host."""
    where = "cpu" if tier == "host" else device
    if has_adapter(plan, job) and not plan.is_aligned(job.out_name):
        return FactoredTensor(plan, job, seed=seed, device=where)
    inputs = load_inputs(plan, job, seed=seed, device=where)
    tensor = PreparedTensor(plan.method, inputs, resident=True)
    if tier == "host":
        from evomerge.kernel.task_vectors import prepare_host

        streamed = prepare_host(plan.method, inputs, device=device)
        if streamed is not None:
            tensor.fused = streamed
    return tensor


def compile_slots(space: SearchSpace) -> tuple[MergePlan, dict[str, list[Slot]]]:
    """The plan of the space's recipes, and for each job the slots its genes fill.

    Found by decoding two probe genomes and planning both: a parameter that takes gene g's
    value in both plans is g's slot (every gene has different values in the two probes, and
    no two genes the same pair), one that is equal in both is fixed. So the slots are exactly
    what `recipe` and the planner make of a genome, with no second copy of their rules."""
    first, second = _probe_genomes(space)
    plan = plan_merge(space.recipe(first))
    other = plan_merge(space.recipe(second), checkpoints=plan.checkpoints)
    genes = {(first[name], second[name]): name for name in first}
    return plan, {
        job.out_name: _slots(job, again, genes) for job, again in zip(plan.jobs, other.jobs)
    }


def _probe_genomes(space: SearchSpace) -> tuple[dict[str, float], dict[str, float]]:
    """Two genomes inside the bounds in which every gene differs, and no two genes take the
    same pair of values."""
    rng = random.Random(0)
    while True:
        first = {g.name: rng.uniform(g.low, g.high) for g in space.genes}
        second = {g.name: rng.uniform(g.low, g.high) for g in space.genes}
        pairs = {(first[name], second[name]) for name in first}
        if len(pairs) == len(first) and all(first[name] != second[name] for name in first):
            return first, second


def _slots(job: TensorJob, again: TensorJob, genes: dict[tuple[float, float], str]) -> list[Slot]:
    if (job.out_name, job.inputs, job.base) != (again.out_name, again.inputs, again.base):
        raise RuntimeError(f"the layout of {job.out_name!r} depends on the genome")
    slots = []
    for kwarg, value in job.kwargs.items():
        if isinstance(value, list):
            pairs = [(i, (v, w)) for i, (v, w) in enumerate(zip(value, again.kwargs[kwarg]))]
        else:
            pairs = [(None, (value, again.kwargs[kwarg]))]
        for model, (v, w) in pairs:
            if (v, w) in genes:
                slots.append(Slot(genes[v, w], kwarg, model))
            elif v != w:
                raise RuntimeError(
                    f"parameter {kwarg!r} of {job.out_name!r} is no single gene's value"
                )
    return slots
