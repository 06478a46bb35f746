"""Candidates of the staged spaces, written into a live model: the model `evomerge merge` makes
of the decoded stages (`evomerge.merging.multistage.run_stages`), bit for bit.

- Method per group: one compiled candidate per method (`evomerge.spaces.parameters.candidate`,
  prepared once per run, so memory holds the prepared inputs once per method); per trial each
  method writes the
  tensors of the groups that chose it. A tensor belongs to the group whose genes it takes,
  which is how the stages' final passthrough picks it (embeddings from the first group's stage,
  norms and head from the last group's).
- Pairwise sequence: the sources are read once; per trial each stage is planned (headers only)
  and merged from them and the stage before it, in memory. Nothing is prepared across trials:
  the inputs of later stages change with every genome. The intermediate is what run_stages
  writes to its scratch folder and reads back (the merge dtype, unrounded), so every stage's
  inputs are the same tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evomerge.errors import CandidateError
from evomerge.io.checkpoint import Checkpoint
from evomerge.merging.executor import PreparedTensor, inputs_of, job_refs
from evomerge.merging.plan import plan_merge
from evomerge.spaces.base import check_genome
from evomerge.spaces.parameters.candidate import CompiledCandidate
from evomerge.spaces.staged.space import MethodPerGroupSpace, PairwiseSpace

if TYPE_CHECKING:
    import torch


def staged_candidate(model: torch.nn.Module, space, *, seed: int, device: str = "cpu"):
    """The candidate that writes `space`'s genomes into `model`."""
    if isinstance(space, MethodPerGroupSpace):
        return MethodPerGroupCandidate(model, space, seed=seed, device=device)
    return PairwiseCandidate(model, space, seed=seed, device=device)


class MethodPerGroupCandidate:
    def __init__(
        self,
        model: torch.nn.Module,
        space: MethodPerGroupSpace,
        *,
        seed: int,
        device: str = "cpu",
    ):
        self.space = space
        self.compiled = {
            m: CompiledCandidate(model, sub, seed=seed, device=device)
            for m, sub in space.spaces.items()
        }
        self.targets = next(iter(self.compiled.values())).targets
        group_of_gene = {g.name: g.group for g in space.genes}
        self.tensors: dict[tuple[str, str], set[str]] = {}  # (method, group) -> its tensors
        for method, compiled in self.compiled.items():
            for job in compiled.jobs:
                groups = {group_of_gene[slot.gene] for slot in job.slots}
                if len(groups) != 1:
                    raise RuntimeError(
                        f"tensor {job.name!r} takes the genes of {len(groups)} layer groups, "
                        "not one"
                    )
                self.tensors.setdefault((method, groups.pop()), set()).add(job.name)

    def apply(self, genome: dict[str, Any]) -> None:
        """Materialise `genome` into the live model; CandidateError where a tensor is not finite."""
        check_genome(genome, self.space.genes)
        for method, labels in self.space.chosen(genome).items():
            only = set().union(*(self.tensors.get((method, label), set()) for label in labels))
            self.compiled[method].apply(genome, only=only)


class PairwiseCandidate:
    def __init__(
        self, model: torch.nn.Module, space: PairwiseSpace, *, seed: int, device: str = "cpu"
    ):
        self.space, self.seed, self.device = space, seed, device
        state = dict(model.named_parameters())
        state.update(dict(model.named_buffers()))
        paths = [space.base, *space.models.values()]
        self.checkpoints: dict[str, Checkpoint | Any] = {path: Checkpoint(path) for path in paths}
        base = self.checkpoints[space.base]
        # A stage's output has the base's tensors (every stage merges whole models): planning a
        # later stage reads the base's headers for it.
        self.checkpoints.update({f"S{s}": base for s in range(1, space.stages)})
        self.sources = {
            path: {name: self.checkpoints[path].tensor(name) for name in base.names}
            for path in paths
        }
        missing = [name for name in base.names if name not in state]
        if missing:
            raise ValueError(f"the evaluation model has no parameters {missing[:3]}")
        self.targets = {name: state[name] for name in base.names}

    def apply(self, genome: dict[str, Any]) -> None:
        """Run the genome's stages in memory, the last one into the live model."""
        stages = self.space.decode(genome)
        earlier: dict[str, torch.Tensor] = {}  # the previous stage's output
        for stage in stages:
            plan = plan_merge(stage.recipe, checkpoints=self.checkpoints)
            merged: dict[str, torch.Tensor] = {}
            for job in plan.jobs:
                tensors = [
                    self.sources[r.model][r.name] if r.model in self.sources else earlier[r.name]
                    for r in job_refs(job)
                ]
                tensor = PreparedTensor(
                    plan.method,
                    inputs_of(plan, job, tensors, seed=self.seed, device=self.device),
                    resident=False,
                )
                if stage.name is not None:
                    merged[job.out_name], _ = tensor.run(job.kwargs)
                elif not tensor.run_into(job.kwargs, self.targets[job.out_name]):
                    raise CandidateError(
                        f"the merged tensor {job.out_name!r} has NaN or Inf values"
                    )
            earlier = merged
