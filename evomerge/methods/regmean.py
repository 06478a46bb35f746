"""RegMean (Jin et al., 2023): each linear layer merged by least squares on its inputs.

For a linear layer y = W x, with X_i the inputs model i's layer sees on model i's own data and
G_i = X_i^T X_i / N_i their Gram matrix, RegMean picks the W closest to every model on its own
inputs:

    W* = argmin_W sum_i ||X_i W^T - X_i W_i^T||^2 = (sum_i W_i G_i) (sum_i G_i)^-1

with G_i's off-diagonal shrunk by alpha (G_i <- alpha G_i + (1 - alpha) diag(G_i)) so that the
sum is well conditioned. Written over task vectors tau_i = W_i - W_base, and with a weight per
model and a scale, as evomerge searches it:

    theta = theta_base + lambda * sum_i w_i * tau_i G_i Gbar^-1,   Gbar = mean_i G_i

Uniform weights (1/n each) and lambda 1 give RegMean exactly. An embedding matrix is a linear
layer over one-hot tokens, so its Gram matrix is diagonal, the token frequencies c_i: each row
(token) is a frequency-weighted mean, E*[t] = sum_i c_i[t] E_i[t] / sum_i c_i[t], with c_i
shrunk toward its mean by alpha (a token no model's data holds gets the plain mean). Such
statistics are stored as the diagonal alone, one value per row. Where a recipe aligns
vocabularies, they arrive laid out by token as the rows are, 0 where a model lacks the token:
the row then comes mostly from the models that have it (alpha's shrinkage leaves the others
a small share). A tensor with no statistics (a
norm) has G_i = I: a weighted sum of task vectors, whose uniform form is the mean RegMean uses
for those. The projected task vectors tau_i G_i Gbar^-1 depend on alpha and
the statistics only, so a search that merges many times computes them once (`MergeInputs`
keeps them); a trial is then a weighted sum.

The statistics come from data (`evomerge.fitness.statistics` collects them in a search); a
recipe names them in its `statistics` mapping (model -> safetensors file). mergekit has no
such method. They are stored at half precision (`evomerge.io.statistics`: a float16
correlation and float32 scales, each distinct input once): on the three demo pools that
moves a merged tensor by up to 0.6% of its largest entry (a float32 solve against a float64
one: 0.006%) and leaves the dev score as it was; bfloat16 Gram matrices moved one by 4.7%
(Gbar^-1, condition number up to 1.5e4 there, amplifies their 8-bit mantissa).
"""

from __future__ import annotations

import torch

from evomerge.methods.registry import MergeInputs, MergeMethod, Param, register


def projected_task_vectors(inputs: MergeInputs, alpha: float) -> torch.Tensor:
    """(M, *shape) float32: tau_i G_i Gbar^-1 for each model (tau_i where there are no
    statistics; for per-row statistics, the rows of tau_i scaled by c_i / cbar)."""
    deltas = torch.stack([inputs.delta(i).float() for i in range(len(inputs.models))])
    stats = inputs.statistics()
    if stats is None or any(g is None for g in stats):
        return deltas
    stats = [g.to(torch.float32) for g in stats]
    if stats[0].dim() == 1:  # per row: a diagonal Gram matrix over one-hot inputs
        shrunk = [alpha * c + (1 - alpha) * c.mean() for c in stats]
        mean = sum(shrunk) / len(shrunk)
        ratios = [  # a row no data reaches keeps tau_i: the plain mean under uniform weights
            torch.where(mean > 0, c / mean.clamp_min(1e-30), torch.ones_like(c)) for c in shrunk
        ]
        return torch.stack([d * r[:, None] for d, r in zip(deltas, ratios)])
    shrunk = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in stats]
    mean = sum(shrunk) / len(shrunk)
    # tau_i G_i Gbar^-1 = (Gbar^-1 G_i tau_i^T)^T: one solve against every model's right side
    # (Gbar is symmetric).
    rhs = torch.cat([g @ d.T for g, d in zip(shrunk, deltas)], dim=1)  # (in, M * out)
    try:
        solved = torch.linalg.solve(mean, rhs)
    except torch.linalg.LinAlgError:  # an input no model's data ever moved: a ridge for it alone
        ridge = 1e-6 * torch.diagonal(mean).mean().clamp_min(1e-30)
        solved = torch.linalg.solve(mean + ridge * torch.eye(len(mean), device=mean.device), rhs)
    return torch.stack([part.T for part in solved.split(deltas.shape[1], dim=1)])


def projections(inputs: MergeInputs, alpha: float) -> torch.Tensor:
    """`projected_task_vectors`, kept with the inputs for the last alpha asked (a search merges
    the same tensor with many weights and, unless it searches alpha, one alpha: the projections
    are then computed once; a searched alpha recomputes them, holding one set at a time)."""
    kept = inputs.cached("projected", 0, lambda: {})
    if kept.get("alpha") != alpha:
        kept.clear()  # the old set goes before the new one is made
        inputs.keep_task_vectors_only()  # theta_i = base + tau_i: a redundant copy from here on
        kept.update(alpha=alpha, tensor=projected_task_vectors(inputs, alpha))
    return kept["tensor"]


def regmean(
    inputs: MergeInputs, *, weight: list[float], alpha: float, lambda_: float
) -> torch.Tensor:
    base = inputs.base
    projected = projections(inputs, alpha)
    w = torch.tensor(weight, dtype=torch.float32, device=projected.device)
    mixed = torch.tensordot(w, projected, dims=1)  # sum_i w_i P_i, no (M, *shape) temporary
    return (base.float() + lambda_ * mixed).to(base.dtype)


register(
    MergeMethod(
        name="regmean",
        merge=regmean,
        params=(
            Param("weight", per_model=True, bounds=(0.0, 1.0), role="weight"),
            Param("alpha", per_model=False, default=0.95, bounds=(0.5, 1.0), limits=(0.0, 1.0)),
            Param("lambda", per_model=False, default=1.0, bounds=(0.5, 1.5)),
        ),
        base_role="required",
        reference="https://arxiv.org/abs/2212.09849",
        one_hot_is_model=False,
        statistics=True,
        mergekit=False,
    )
)
