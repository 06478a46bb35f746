"""The parameter space kind: merge coefficients of one method, per group of layers (a space file
that names no `kind`)."""

from evomerge.spaces.registry import PARAMETERS, SpaceKind, register_kind


def build(data, where: str, *, base: str, models: dict[str, str], dtype: str | None):
    """The parameter space of a file's mapping over a pool (reads the base's layer count)."""
    from evomerge.io.checkpoint import Checkpoint
    from evomerge.merging.recipe import validate_model
    from evomerge.spaces.parameters.space import SearchSpace, SpaceConfig

    return SearchSpace(
        validate_model(SpaceConfig, data, where),
        base=base,
        models=models,
        num_layers=Checkpoint(base).num_layers,
        dtype=dtype,
    )


def candidate(model, space, *, seed: int, device: str, dtype: str | None, tier: str = "device"):
    """The space's recipes compiled once against the pool, merged into `model` per trial, its
    inputs on the device or in host memory (`tier`, evomerge/spaces/parameters/candidate.py)."""
    from evomerge.spaces.parameters.candidate import CompiledCandidate

    return CompiledCandidate(model, space, seed=seed, device=device, tier=tier)


register_kind(
    SpaceKind(
        PARAMETERS,
        build,
        candidate,
        summary="one method's coefficients per layer group (and per part of a layer)",
    )
)
