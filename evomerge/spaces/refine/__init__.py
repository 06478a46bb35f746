"""Learned merging: per-tensor, per-model weights of a task-vector space, refined by gradient.

`merge.py` makes the merged weights a differentiable function of the weights (masks fixed);
`recipe.py` writes a refined candidate as an ordinary recipe with per-tensor `filter` values and
applies it to a compiled candidate through the same executor, so what was scored is what ships.

This package face stays light (no torch): `report` and `export` only need to recognise a
refined trial; they import `recipe.py` when they meet one.
"""

REFINED_ATTR = "refined_weights"
"""The trial user attribute holding a refined trial's weights: tensor name -> one per model."""
