"""Spherical interpolation: SLERP, NuSLERP and Multi-SLERP.

SLERP moves along the great circle between two flattened tensors instead of the chord:

    slerp(t; a, b) = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b,
    cos(theta) = <a/|a|, b/|b|>,

falling back to linear interpolation when the two are (anti)parallel.
"""

from __future__ import annotations

import torch

from evomerge.methods.registry import MergeInputs, MergeMethod, Param, register

DOT_THRESHOLD = 0.9995


def slerp_tensors(t: float, a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """SLERP over the whole flattened tensor, computed in float32 (float64 stays float64)."""
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    x, y = a.reshape(1, -1).to(dtype), b.reshape(1, -1).to(dtype)  # (1, N)
    t_ = torch.tensor(t, dtype=dtype, device=a.device)
    norm_x = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    norm_y = torch.linalg.vector_norm(y, dim=1, keepdim=True)
    norm_x = torch.where(norm_x > eps, norm_x, 1)
    norm_y = torch.where(norm_y > eps, norm_y, 1)
    cos = ((x / norm_x) * (y / norm_y)).sum(dim=1, keepdim=True).clamp(-1, 1)
    nearly_parallel = cos.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(nearly_parallel, 0, cos))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(nearly_parallel, 1 - t_, torch.sin((1 - t_) * theta) / sin_theta)
    coef_b = torch.where(nearly_parallel, t_, torch.sin(t_ * theta) / sin_theta)
    return (coef_a * x + coef_b * y).to(a.dtype).view(a.shape)


def slerp(inputs: MergeInputs, *, t: float) -> torch.Tensor:
    """t = 0 gives the base model, t = 1 the other one."""
    if len(inputs.models) != 1:
        raise ValueError("slerp merges exactly two models: base_model and one other")
    return slerp_tensors(t, inputs.base, inputs.models[0])


def nuslerp_tensors(
    t: float, a: torch.Tensor, b: torch.Tensor, *, row_wise: bool, flatten: bool, eps: float = 1e-8
) -> torch.Tensor:
    """SLERP along rows (or columns, or the flattened tensor), in the tensors' own dtype."""
    shape = a.shape
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / torch.norm(v, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(a) * unit(b), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / sin_theta
    result = torch.where(colinear, (1 - t) * a + t * b, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp(
    inputs: MergeInputs, *, weight: list[float], nuslerp_flatten: bool, nuslerp_row_wise: bool
) -> torch.Tensor:
    """Two models, t = w_1 / (w_0 + w_1); with a base, SLERP of the two task vectors."""
    if len(inputs.models) != 2:
        raise ValueError("nuslerp merges exactly two models (besides an optional base)")
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    a, b = inputs.models
    options = dict(row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)
    if inputs.base is None:
        return nuslerp_tensors(t, a, b, **options)
    base = inputs.base
    return base + nuslerp_tensors(t, a - base, b - base, **options)


def multislerp(
    inputs: MergeInputs, *, weight: list[float], normalize_weights: bool, eps: float
) -> torch.Tensor:
    """Barycentric SLERP of many models: average on the tangent space at the weighted mean
    direction, map back with the exponential map, scale by the weighted mean norm."""
    if len(inputs.models) == 1:
        return inputs.models[0]
    points = torch.stack(inputs.models)
    if inputs.base is not None:
        points = points - inputs.base
    flat = points.view(points.shape[0], -1)  # (M, N)
    w = torch.tensor(weight, dtype=points.dtype, device=points.device)
    if normalize_weights:
        if abs(sum(weight)) < 1e-12:
            raise ValueError(
                "the weights sum to 0, so they cannot be normalised; "
                "change them or set normalize_weights: false"
            )
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)  # (M, 1)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if points.shape[0] != 2:
            raise ValueError("multislerp: the weighted directions cancel out; change the weights")
        result = (points[0] * w[0] + points[1] * w[1]).view(points.shape[1:])
        return result if inputs.base is None else result + inputs.base
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangents * w.view(-1, 1)).sum(0)
    step_norm = torch.norm(step) + eps
    direction = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
    result = (direction * (norms.squeeze(-1) * w).sum()).view(points.shape[1:])
    return result if inputs.base is None else result + inputs.base


register(
    MergeMethod(
        name="slerp",
        merge=slerp,
        params=(
            Param("t", per_model=False, bounds=(0.0, 1.0), limits=(0.0, 1.0), role="interpolation"),
        ),
        base_role="required",
        min_models=1,
        max_models=1,
        reference="https://en.wikipedia.org/wiki/Slerp",
    )
)
register(
    MergeMethod(
        name="nuslerp",
        merge=nuslerp,
        params=(
            Param("weight", per_model=True, bounds=(0.0, 1.0), role="weight"),
            Param("nuslerp_flatten", per_model=False, default=True, kind=bool),
            Param("nuslerp_row_wise", per_model=False, default=False, kind=bool),
        ),
        base_role="optional",
        min_models=2,
        max_models=2,
    )
)
register(
    MergeMethod(
        name="multislerp",
        merge=multislerp,
        params=(
            Param("weight", per_model=True, bounds=(0.0, 1.0), role="weight"),
            Param("normalize_weights", per_model=False, default=True, kind=bool),
            Param("eps", per_model=False, default=1e-8),
        ),
        base_role="optional",
        reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    )
)
