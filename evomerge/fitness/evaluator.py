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

Each call is one `lm_eval.evaluator.evaluate` over the prebuilt task dict: no `simple_evaluate`
(it re-collects environment info on every call), no request cache (it keys on the model name,
which does not change between candidates), no bootstrap.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from evomerge.fitness.config import FitnessConfig, combine

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
    """lm-eval tasks built once, scoring the live `model` on every `score` call."""

    def __init__(
        self, model: Any, tokenizer: Any, config: FitnessConfig, run_dir: str | Path, *, split: str = "dev"
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

        from evomerge.fitness.backends import make_lm
        from evomerge.fitness.tasks import build_task_set

        self.model = model
        self.split = split
        self.tasks = build_task_set(config, self.run_dir, split=split)
        self.lm = make_lm(
            config.backend,
            model,
            tokenizer,
            batch_size=config.batch_size,
            max_length=config.max_length,
        )

    def score(self, *, full: bool = False, per_example: bool = False) -> FitnessResult:
        """Score the model as its parameters are now: the fixed subset, or all if `full`;
        `per_example` also keeps each example's metric value (for standard errors)."""
        from lm_eval.evaluator import evaluate

        samples = None if full or self.tasks.subset is None else self.tasks.subset
        started = time.perf_counter()
        out = evaluate(
            lm=self.lm,
            task_dict=self.tasks.task_dict,
            samples=samples,
            cache_requests=False,
            bootstrap_iters=0,
            log_samples=per_example,
        )
        seconds = time.perf_counter() - started
        if out is None:  # only non-zero ranks of a distributed run get None
            raise RuntimeError("lm-eval returned no results on this process")

        tables = {**out.get("results", {}), **out.get("groups", {})}
        per_task = {}
        for spec in self.tasks.specs:
            row = tables.get(spec.name, {})
            if spec.metric_key not in row:
                raise RuntimeError(
                    f"lm-eval reported no {spec.metric_key!r} for {spec.name!r}: {sorted(row)}"
                )
            per_task[spec.name] = float(row[spec.metric_key])
        metrics = {
            name: {
                k: float(v)
                for k, v in tables[name].items()
                if isinstance(v, (int, float)) and "," in k and "_stderr," not in k
            }
            for name in tables
        }
        n_examples = {
            name: len(samples[name]) if samples else n for name, n in self.tasks.n_docs.items()
        }
        return FitnessResult(
            value=combine(self.tasks.specs, per_task, self.tasks.maximize),
            per_task=per_task,
            full=samples is None,
            n_examples=n_examples,
            seconds=seconds,
            metrics=metrics,
            per_example=self._per_example(out.get("samples", {})) if per_example else {},
        )

    def score_examples(self, examples: dict[str, list[int]]) -> dict[str, list[float]]:
        """Per leaf task, the configured metric's value on each example of `examples` (document
        indices into the scored split), in the order given: what multi-fidelity search grows
        example by example, never scoring one twice. Aggregate with `aggregate`, combine the
        per-task aggregates with `value_of`."""
        from lm_eval.evaluator import evaluate

        wanted = {task: sorted(set(indices)) for task, indices in examples.items() if indices}
        if not wanted:
            return {task: [] for task in examples}
        out = evaluate(
            lm=self.lm,
            task_dict=_only(self.tasks.task_dict, wanted),
            samples=wanted,
            cache_requests=False,
            bootstrap_iters=0,
            log_samples=True,
        )
        if out is None:
            raise RuntimeError("lm-eval returned no results on this process")
        by_doc = {}
        for task, rows in out.get("samples", {}).items():
            spec = next((s for s in self.tasks.specs if s.name == task), None)
            metric, _, filter_name = (spec.metric_key if spec else "acc,none").partition(",")
            by_doc[task] = {r["doc_id"]: float(r[metric]) for r in rows if r.get("filter", "none") == filter_name}
        return {task: [by_doc[task][i] for i in indices] if indices else [] for task, indices in examples.items()}

    def value_of(self, per_task: dict[str, float]) -> float:
        """The combined fitness (larger is better) of per-task aggregates."""
        return combine(self.tasks.specs, per_task, self.tasks.maximize)

    def _per_example(self, samples: dict[str, list[dict]]) -> dict[str, list[float]]:
        """Each leaf task's metric value per example, in document order (numeric metrics only)."""
        out = {}
        for spec in self.tasks.specs:
            metric, _, filter_name = spec.metric_key.partition(",")
            rows = [r for r in samples.get(spec.name, []) if r.get("filter", "none") == filter_name]
            values = [r.get(metric) for r in sorted(rows, key=lambda r: r["doc_id"])]
            if values and all(isinstance(v, (int, float)) for v in values):
                out[spec.name] = [float(v) for v in values]
        return out

    def aggregate(self, task: str, values: list[float]) -> float:
        """The task's own aggregation of per-example values (mean, perplexity, ...)."""
        metric = next(s for s in self.tasks.specs if s.name == task).metric_key.split(",")[0]
        return float(self.tasks.leaf_tasks[task].aggregation()[metric](values))


def _only(task_dict: dict[str, Any], names: dict[str, list[int]]) -> dict[str, Any]:
    """`task_dict` restricted to the leaf tasks named in `names`."""
    return {**task_dict, "tasks": {n: t for n, t in task_dict["tasks"].items() if n in names}}
