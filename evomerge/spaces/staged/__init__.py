"""Spaces whose candidates are multi-stage recipes: a method per layer group, merges in pairs."""

from evomerge.spaces.registry import SpaceKind, register_kind
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


def _builder(space_class, config_class):
    def build(data, where: str, *, base: str, models: dict[str, str], dtype: str | None):
        from evomerge.io.checkpoint import Checkpoint
        from evomerge.merging.recipe import validate_model

        return space_class(
            validate_model(config_class, data, where),
            base=base,
            models=models,
            num_layers=Checkpoint(base).num_layers,
            dtype=dtype,
        )

    return build


def candidate(model, space, *, seed: int, device: str, dtype: str | None):
    return staged_candidate(model, space, seed=seed, device=device)


register_kind(
    SpaceKind(
        "method_per_group",
        _builder(MethodPerGroupSpace, MethodPerGroupConfig),
        candidate,
        categorical=True,  # each group's method
        summary="a merge method chosen per layer group, beside its coefficients",
    )
)
register_kind(
    SpaceKind(
        "pairwise",
        _builder(PairwiseSpace, PairwiseConfig),
        candidate,
        categorical=True,  # the order of the merges
        summary="the pool merged two models at a time, in a searched order",
        why_not_aligned=(
            "its in-memory stages read each earlier stage as having the base's vocabulary, "
            "and a union would number its new tokens in the searched order"
        ),
    )
)
