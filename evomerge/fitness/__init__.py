"""Fitness: lm-eval tasks built once, scoring a live model whose weights change in place.

- `config`    — `FitnessConfig`: tasks (name, metric, weight, direction), task paths, subset.
- `tasks`     — builds the lm-eval tasks once (local task folders made location-independent).
- `backends`  — the registry of backends ("hf"; "vllm" in `vllm_backend`), one object each:
                wrap the live model as an lm-eval `LM`, build its requests, sync its weights.
- `evaluator` — `Evaluator.score()` -> `FitnessResult`.

Importing this package is cheap; torch and lm-eval load when an `Evaluator` is built.
"""

from evomerge.fitness.config import FitnessConfig, SubsetConfig, TaskSpec
from evomerge.fitness.evaluator import Evaluator, FitnessResult

__all__ = ["Evaluator", "FitnessConfig", "FitnessResult", "SubsetConfig", "TaskSpec"]
