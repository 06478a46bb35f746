"""The merged weights of a task-vector candidate as a differentiable function of its weights.

With the trial's densities and merge seed fixed, every member of the task-vector family
(`evomerge.methods.task_arithmetic`) merges one tensor as

    theta(w) = theta_base + lambda * sum_i(w_i * a_i(w) * D_i) / Z(w)

where D_i is model i's task vector after its sparsification (TIES trimming, DARE drops and
L1 rescale, ...: a function of density and seed only, so fixed here), a_i the sign-consensus
mask (1 without consensus) and Z the normaliser (the sum of contributing weights, or 1).
a_i is piecewise constant in w (it changes only where a weighted sum changes sign), so within
a region the gradient of theta in w is exact, and it is exact everywhere for task arithmetic.
The real candidate is always merged by the executor (`recipe.apply_refined`); this module
only gives the direction.

One weight per model per output tensor: the granularity a black-box search cannot reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from evomerge.errors import UserError
from evomerge.methods.registry import registered_methods
from evomerge.methods.regmean import projections
from evomerge.methods.task_arithmetic import sparsified_delta

if TYPE_CHECKING:
    from evomerge.spaces.parameters.candidate import CompiledCandidate, CompiledJob

TASK_VECTOR_METHODS = tuple(
    m.name for m in registered_methods() if m.task_vectors is not None or m.name == "regmean"
)
"""The methods whose weights refinement can learn: the task-vector family, and RegMean (task
arithmetic over projected task vectors, `evomerge.methods.regmean`)."""


@dataclass
class _Term:
    """One output tensor: its base, its fixed sparsified task vectors and its global settings."""

    name: str
    base: torch.Tensor  # (*shape) float32
    deltas: torch.Tensor  # (M, *shape) float32
    consensus: bool
    normalize: bool
    lambda_: float

    def merged(self, w: torch.Tensor) -> torch.Tensor:
        """theta(w) for this tensor's weights `w` (M,), differentiable in `w`."""
        w = w.view(-1, *([1] * (self.deltas.dim() - 1)))  # (M, 1, ..., 1)
        weighted = self.deltas * w  # (M, *shape)
        if self.consensus:
            with torch.no_grad():  # the elected sign: piecewise constant, so no gradient
                elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
                agree = (weighted.sign() == elected).float()
            mixed = (weighted * agree).sum(dim=0)
            divisor = (w * agree).sum(dim=0)
            divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        else:
            mixed = weighted.sum(dim=0)
            divisor = w.sum(dim=0)
            divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
        if self.normalize:
            mixed = mixed / divisor
        return self.base + self.lambda_ * mixed


class DifferentiableMerge:
    """The candidate of `genome` with one free weight per model per output tensor.

    `start` (J, M) holds the genome's weights, row j for output tensor `names[j]`; `merged(w)`
    gives every output tensor's weights for a (J, M) tensor of weights. Holds each tensor's
    sparsified task vectors in float32 (one more copy of the task vectors) while it lives."""

    def __init__(self, candidate: CompiledCandidate, genome: dict[str, float]):
        self.terms = [self._term(job, job.parameters(genome)) for job in candidate.jobs]
        self.names = [t.name for t in self.terms]
        self.start = torch.tensor(
            [job.parameters(genome)["weight"] for job in candidate.jobs], dtype=torch.float32
        )

    @staticmethod
    def _term(job: CompiledJob, kwargs: dict) -> _Term:
        inputs = getattr(job.tensor, "inputs", None)
        method = getattr(job.tensor, "method", None)
        if method is not None and method.name == "regmean" and inputs is not None:
            return _Term(
                name=job.name,
                base=inputs.base.float(),
                deltas=projections(inputs, kwargs["alpha"]),
                consensus=False,
                normalize=False,
                lambda_=kwargs["lambda_"],
            )
        if inputs is None or method is None or method.task_vectors is None:
            raise UserError(
                f"refinement by gradient cannot differentiate the merge of {job.name!r} "
                f"(it learns the weights of {', '.join(TASK_VECTOR_METHODS)} over full models)"
            )
        rule, consensus = method.task_vectors.sparsify, method.task_vectors.consensus
        # A fresh view of the inputs: what is derived here is freed with this object, not kept
        # beside the search's resident state for the rest of the run.
        fresh = inputs.view()
        deltas = [
            sparsified_delta(
                fresh,
                i,
                rule=rule,
                density=kwargs["density"][i],
                rescale=kwargs["rescale"],
                gamma=kwargs["gamma"][i] if "gamma" in kwargs else 0.0,
                epsilon=kwargs["epsilon"][i] if "epsilon" in kwargs else 0.0,
            ).float()
            for i in range(len(inputs.models))
        ]
        return _Term(
            name=job.name,
            base=inputs.base.float(),
            deltas=torch.stack(deltas),
            consensus=consensus,
            normalize=kwargs["normalize"],
            lambda_=kwargs["lambda_"],
        )

    def merged(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> merged tensor for weights `w` (J, M)."""
        return {term.name: term.merged(w[j]) for j, term in enumerate(self.terms)}

    def coefficients(self, w: torch.Tensor) -> dict[str, list[float]]:
        """name -> the weights of its models, as plain floats (what a study and a recipe keep)."""
        return {name: [float(v) for v in row] for name, row in zip(self.names, w.tolist())}
