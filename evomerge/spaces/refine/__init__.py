"""Learned merging: per-tensor, per-model weights of a task-vector space, refined by gradient.

`merge.py` makes the merged weights a differentiable function of the weights (masks fixed);
`recipe.py` writes a refined candidate as an ordinary recipe with per-tensor `filter` values and
applies it to a compiled candidate through the same executor, so what was scored is what ships.
"""

from evomerge.spaces.refine.merge import TASK_VECTOR_METHODS, DifferentiableMerge
from evomerge.spaces.refine.recipe import REFINED_ATTR, apply_refined, refined_recipe

__all__ = [
    "REFINED_ATTR",
    "TASK_VECTOR_METHODS",
    "DifferentiableMerge",
    "apply_refined",
    "refined_recipe",
]
