"""Data-flow search: which layers run, in which order (layer stacking), beside per-layer weights."""

from evomerge.dataflow.candidate import DataflowCandidate
from evomerge.dataflow.space import DataflowConfig, DataflowSpace, Step

__all__ = ["DataflowCandidate", "DataflowConfig", "DataflowSpace", "Step"]
