"""Spaces whose candidates are multi-stage recipes: a method per layer group, merges in pairs."""

from evomerge.spaces.staged.candidate import staged_candidate
from evomerge.spaces.staged.space import (
    MethodPerGroupConfig,
    MethodPerGroupSpace,
    PairwiseConfig,
    PairwiseSpace,
)

__all__ = [
    "MethodPerGroupConfig",
    "MethodPerGroupSpace",
    "PairwiseConfig",
    "PairwiseSpace",
    "staged_candidate",
]
