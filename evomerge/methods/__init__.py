"""Merge methods: one module each, all registered in `registry` on import."""

from evomerge.methods import (  # noqa: F401  (importing registers them)
    arcee_fusion,
    karcher,
    linear,
    model_stock,
    nearswap,
    passthrough,
    ram,
    sce,
    spherical,
    task_arithmetic,
)
from evomerge.methods.registry import MergeInputs, MergeMethod, Param, get_method, method_names

__all__ = ["MergeInputs", "MergeMethod", "Param", "get_method", "method_names"]
