"""Score a live in-memory model on lm-eval tasks, again and again, with no reloads.

    evaluator = Evaluator(model, tokenizer, fitness_config, run_dir)   # builds tasks once
    first = evaluator.score()             # the fixed subset (or everything if none is set)
    with torch.no_grad():
        for p, new in zip(model.parameters(), candidate):
            p.copy_(new)                   # the search swaps weights in place ...
    second = evaluator.score()            # ... and the next call scores them
    final = evaluator.score(full=True)    # every example of every task
    held_out = Evaluator(model, tokenizer, fitness_config, run_dir, split="test")  # the report's

`split` is the role: "dev" (the search's) or "test" (only the report's; see `fitness.config`).

The requests are built and tokenised once per run (`fitness.prepared`; "hf" also batches
them once): a call runs the model, then lm-eval's own filters, `process_results` and
aggregation, with scores equal to `lm_eval.evaluator.evaluate`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.fitness.config import FitnessConfig, combine

if TYPE_CHECKING:
    from evomerge.fitness.prepared import Values

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FitnessResult:
    """One scoring of the model.

    `value` is larger-is-better (see `fitness.config.combine`); it is a plain float and may be
    non-finite if a metric is (e.g. the perplexity of a collapsed merge), which callers check.
    """

    value: float
    per_task: dict[str, float]
    """The configured metric of each task, as lm-eval reports it (not negated)."""
    full: bool
    """True when every example was scored, False for the fixed subset."""
    n_examples: dict[str, int]
    seconds: float
    metrics: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    """Every numeric metric each task reported, keyed like `acc,none`."""
    per_example: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    """With `score(per_example=True)`: per task (a leaf task, not a group), the configured
    metric's value for each example in document order, as the task's aggregation takes them."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Evaluator:
    """lm-eval tasks and their requests built once, scoring the live `model` on every call."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: FitnessConfig,
        run_dir: str | Path,
        *,
        split: str = "dev",
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

        from evomerge.fitness.backends import get_backend
        from evomerge.fitness.tasks import build_task_set

        self.model = model
        self.split = split
        self.tasks = build_task_set(config, self.run_dir, split=split)
        self.backend = get_backend(config.backend)
        self.lm = self.backend.make_lm(
            model, tokenizer, batch_size=config.batch_size, max_length=config.max_length
        )
        from evomerge.fitness.prepared import PromptFormat

        prompt = PromptFormat.of(config)
        # a backend's `prepare` takes `prompt` when prompts are not lm-eval's plain default
        options = {"prompt": prompt} if prompt != PromptFormat() else {}
        self.prepared = self.backend.prepare(self.lm, self.tasks.leaf_tasks, **options)
        """The requests, built once."""

    def sync_weights(self) -> None:
        """Make the next score see the live model's weights as they are now (after a change)."""
        self.backend.sync(self.lm)

    def score(self, *, full: bool = False, per_example: bool = False) -> FitnessResult:
        """Score the model as its parameters are now: the fixed subset, or all if `full`;
        `per_example` also keeps each example's metric value (for standard errors)."""
        subset = None if full else self.tasks.subset
        wanted = subset or {name: list(range(n)) for name, n in self.tasks.n_docs.items()}
        started = time.perf_counter()
        values = self._values(wanted)
        aggregated = {
            task: {
                f"{metric},{filt}": _aggregate(self.tasks.leaf_tasks[task], metric, v)
                for (metric, filt), v in rows.items()
            }
            for task, rows in values.items()
        }
        per_task = {}
        for spec in self.tasks.specs:
            row = aggregated[spec.name]
            if spec.metric_key not in row:
                raise RuntimeError(
                    f"lm-eval reported no {spec.metric_key!r} for {spec.name!r}: {sorted(row)}"
                )
            per_task[spec.name] = row[spec.metric_key]
        return FitnessResult(
            value=combine(self.tasks.specs, per_task, self.tasks.maximize),
            per_task=per_task,
            full=subset is None,
            n_examples={name: len(docs) for name, docs in wanted.items()},
            seconds=time.perf_counter() - started,
            metrics={
                task: {k: v for k, v in row.items() if isinstance(v, float)}
                for task, row in aggregated.items()
            },
            per_example=self._per_example(values) if per_example else {},
        )

    def score_examples(self, examples: dict[str, list[int]]) -> dict[str, list[float]]:
        """Per leaf task, the configured metric's value on each example of `examples` (document
        indices into the scored split), in the order given: what multi-fidelity search grows
        example by example, never scoring one twice. Aggregate with `aggregate`, combine the
        per-task aggregates with `value_of`."""
        wanted = {
            task: list(dict.fromkeys(indices)) for task, indices in examples.items() if indices
        }
        values = self._per_example(self._values(wanted)) if wanted else {}
        by_doc = {task: dict(zip(wanted[task], values[task])) for task in values}
        return {task: [by_doc[task][i] for i in indices] for task, indices in examples.items()}

    def value_of(self, per_task: dict[str, float]) -> float:
        """The combined fitness (larger is better) of per-task aggregates."""
        return combine(self.tasks.specs, per_task, self.tasks.maximize)

    def aggregate(self, task: str, values: list[float]) -> float:
        """The task's own aggregation of per-example values (mean, perplexity, ...)."""
        metric = self._spec(task).metric_key.split(",")[0]
        return _aggregate(self.tasks.leaf_tasks[task], metric, values)

    def _spec(self, task: str):
        return next(s for s in self.tasks.specs if s.name == task)

    def _values(self, wanted: dict[str, list[int]]) -> dict[str, Values]:
        """Per task, per (metric, filter): lm-eval's value of each wanted document, in order."""
        for task, docs in wanted.items():
            n = self.tasks.n_docs[task]
            if any(not 0 <= d < n for d in docs):
                raise ValueError(f"{task!r} has documents 0..{n - 1}; asked for {docs}")
        return self.prepared.run(wanted)

    def _per_example(self, values: dict[str, Values]) -> dict[str, list[float]]:
        """Each leaf task's configured metric per example (numeric metrics only)."""
        out = {}
        for task, rows in values.items():
            metric, _, filter_name = self._spec(task).metric_key.partition(",")
            row = rows.get((metric, filter_name), [])
            if row and all(isinstance(v, (int, float)) for v in row):
                out[task] = [float(v) for v in row]
        return out


def _aggregate(task: Any, metric: str, values: list[Any]) -> Any:
    """lm-eval's aggregation of `metric` over per-document values, a float where it is a number."""
    value = task.aggregation()[metric](values)
    return float(value) if isinstance(value, (int, float)) else value
