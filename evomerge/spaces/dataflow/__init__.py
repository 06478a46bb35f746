"""Data-flow search: which layers run, in which order (layer stacking), beside per-layer weights."""

from evomerge.spaces.dataflow.candidate import DataflowCandidate
from evomerge.spaces.dataflow.space import DataflowConfig, DataflowSpace, Step
from evomerge.spaces.registry import SpaceKind, register_kind

__all__ = ["DataflowCandidate", "DataflowConfig", "DataflowSpace", "Step"]


def build(data, where: str, *, base: str, models: dict[str, str], dtype: str | None):
    from evomerge.merging.recipe import validate_model

    return DataflowSpace(
        validate_model(DataflowConfig, data, where), base=base, models=models, dtype=dtype
    )


def candidate(model, space, *, seed: int, device: str, dtype: str | None):
    """The sources' layers loaded once; a trial points the live model at its path's layers."""
    from evomerge.io.dtypes import torch_dtype

    return DataflowCandidate(model, space, dtype=torch_dtype(dtype) or model.dtype, device=device)


register_kind(
    SpaceKind(
        "dataflow",
        build,
        candidate,
        # a running engine keeps the depth it was started with
        backends=("hf",),
        why_backends=(
            "a data-flow space changes the model's depth per trial, which a running vLLM engine "
            "cannot"
        ),
        summary="which layers of which models run, in which order",
    )
)
