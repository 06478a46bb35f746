"""Data-flow search: which layers run, in which order (layer stacking), beside per-layer weights."""

from evomerge.spaces.dataflow.candidate import DataflowCandidate
from evomerge.spaces.dataflow.space import DataflowConfig, DataflowSpace, Step

__all__ = ["DataflowCandidate", "DataflowConfig", "DataflowSpace", "Step"]
