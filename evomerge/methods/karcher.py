"""Karcher mean: the Riemannian (geodesic) mean of the inputs' directions on the unit sphere,
scaled by their mean norm. Equal weights; the base model, if named, is one more input."""

from __future__ import annotations

import torch

from evomerge.methods.registry import MergeInputs, MergeMethod, Param, register


def karcher_mean(
    tensors: list[torch.Tensor], alphas: list[float], *, max_iter: int, tol: float
) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    norm_dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(x.to(norm_dtype)) for x in tensors]
    units = [
        torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype)
        for x, n in zip(tensors, norms)
    ]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(x * 0 for x in tensors)
    alpha_total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / alpha_total for i in valid]
    points = [units[i] for i in valid]

    mean = torch.zeros_like(points[0])
    for w, p in zip(weights, points):
        mean += w * p
    mean_norm = torch.linalg.vector_norm(mean.to(norm_dtype))
    mean = points[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)

    for _ in range(max_iter):
        # Riemannian gradient: weighted sum of log maps of every point at the current mean.
        tangent = torch.zeros_like(mean)
        for w, p in zip(weights, points):
            cos = torch.clamp(torch.dot(mean.flatten(), p.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (p - cos * mean)
        step = torch.linalg.vector_norm(tangent.to(norm_dtype))
        if step.item() < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)
        length = torch.linalg.vector_norm(mean.to(norm_dtype))
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)
    scale = sum(a * n for a, n in zip(alphas, norms))
    return scale * mean


def karcher(inputs: MergeInputs, *, max_iter: int, tol: float) -> torch.Tensor:
    n = len(inputs.models)
    return karcher_mean(inputs.models, [1.0 / n] * n, max_iter=max_iter, tol=tol)


register(
    MergeMethod(
        name="karcher",
        merge=karcher,
        params=(
            Param("max_iter", per_model=False, default=10, kind=int),
            Param("tol", per_model=False, default=1e-5),
        ),
        base_role="input",
        reference="https://arxiv.org/abs/2603.04972",
    )
)
