"""What "fitness" means for a run: which lm-eval tasks, which metric of each, and how they combine.

A fitness config is usually a block of the search config, e.g.::

    fitness:
      task_paths: [eval_tasks]
      tasks:
        - {name: evomerge_add, metric: acc, weight: 1.0}
        - {name: evomerge_rev, metric: perplexity, direction: minimize}
        - evomerge_sort                      # a bare name: the task's metric, weight 1
      subset: {count: 50}                    # or {fraction: 0.25}; sampling: first | random
      backend: hf
      dev_split: dev                         # what the search scores ...
      test_split: test                       # ... and what only the report does
      apply_chat_template: false             # true for instruct/chat models (as lm-eval's)

A task whose YAML names both a `dev_split` and a `test_split` (in `dataset_kwargs.data_files`,
`validation_split` or `test_split`) is scored on dev by the search and on test only for the
report and the model card, after the search: the study never sees a test score. A task with
one split is scored on it for both, and the report says it has no held-out split.

The combined value is always "larger is better": the weighted mean of each task's metric, with
minimised metrics negated (see `FitnessConfig.combine`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.errors import UserError

Direction = Literal["auto", "maximize", "minimize"]


class TaskSpec(BaseModel):
    """One lm-eval task and the metric of it that counts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    metric: str | None = Field(default=None, min_length=1)
    """A metric name as lm-eval reports it: `acc`, or with a filter, `exact_match,strict-match`.
    None: the task's only metric (or `acc` among several), resolved when the tasks are built."""
    weight: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    direction: Direction = "auto"
    """`auto` takes the task's own `higher_is_better` for this metric."""

    @property
    def metric_key(self) -> str:
        """The key of the metric in lm-eval's results (`acc` -> `acc,none`); the spec must be
        resolved (`TaskSet.specs` are)."""
        if self.metric is None:
            raise ValueError(f"task {self.name!r}: its metric is resolved when the tasks are built")
        return self.metric if "," in self.metric else f"{self.metric},none"


class SubsetConfig(BaseModel):
    """A fixed part of every task, used for cheap trial scoring.

    The same examples are used on every call, so trials stay comparable. Give exactly one of
    `count` (examples per task) or `fraction` (of each task, at least one example).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int | None = Field(default=None, ge=1)
    fraction: float | None = Field(default=None, gt=0.0, le=1.0)
    sampling: Literal["first", "random"] = "random"
    """`first`: the first examples in file order; `random`: a sample fixed by `seed`."""
    seed: int = 0

    @model_validator(mode="after")
    def _one_size(self) -> SubsetConfig:
        if (self.count is None) == (self.fraction is None):
            raise ValueError("give exactly one of subset.count or subset.fraction")
        return self

    def size_of(self, n_docs: int) -> int:
        """How many of `n_docs` examples the subset takes."""
        if self.count is not None:
            return min(self.count, n_docs)
        return max(1, min(n_docs, round(self.fraction * n_docs)))


class FitnessConfig(BaseModel):
    """Tasks, subset and backend of a fitness evaluation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: list[TaskSpec] = Field(min_length=1)
    task_paths: list[Path] = Field(default_factory=list)
    """Folders (or single YAML files) of local lm-eval tasks; relative `data_files` in their
    YAMLs are read relative to the YAML file itself."""
    subset: SubsetConfig | None = None
    """Used by `Evaluator.score(full=False)`; without it every call scores the full tasks."""
    backend: str = "hf"
    """One of `evomerge.fitness.backends.BACKENDS`. `hf`: lm-eval's HFLM over the live model;
    `vllm`: one vLLM engine per run, the live model's weights pushed into it after each change
    (needs vLLM: `make vllm-venv` on CPU)."""
    batch_size: int = Field(default=64, ge=1)
    max_length: int | None = Field(default=None, ge=1)
    offline: bool = True
    """Set HF_HUB_OFFLINE / HF_DATASETS_OFFLINE so nothing is fetched from the network."""
    dev_split: str = Field(default="dev", min_length=1)
    """The split the search scores, in tasks that have both splits."""
    test_split: str = Field(default="test", min_length=1)
    """The held-out split, scored only for the report and the model card."""
    allow_public_benchmarks: bool = False
    """Search on well-known public benchmarks anyway (see `PUBLIC_BENCHMARKS`)."""
    apply_chat_template: bool = False
    """Wrap each prompt in the tokenizer's chat template, as lm-eval's `--apply_chat_template`
    does: how an instruct or chat model is used, so how it should be scored."""
    system_instruction: str | None = None
    """A system message before each prompt (lm-eval's `--system_instruction`)."""
    fewshot_as_multiturn: bool = False
    """With the chat template, few-shot examples as earlier turns of the conversation rather
    than one user message (lm-eval's `--fewshot_as_multiturn`; needs apply_chat_template)."""

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        from evomerge.fitness.backends import get_backend  # a light module: no torch

        try:
            get_backend(value)
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("tasks", mode="before")
    @classmethod
    def _bare_names(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _check_tasks(self) -> FitnessConfig:
        names = [t.name for t in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"tasks listed twice: {', '.join(duplicates)}")
        if sum(t.weight for t in self.tasks) <= 0:
            raise ValueError("at least one task needs a weight above 0")
        if self.dev_split == self.test_split:
            raise ValueError("dev_split and test_split must name different splits")
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("fewshot_as_multiturn needs apply_chat_template: true")
        public = [n for n in names if is_public_benchmark(n)]
        if public and not self.allow_public_benchmarks:
            raise ValueError(
                f"{', '.join(public)}: a search tuned on a public benchmark overfits its test set "
                "and its score no longer measures anything; search on your own dev data, or set "
                "fitness.allow_public_benchmarks: true if you mean it"
            )
        return self

    def resolved(self, base_dir: Path) -> FitnessConfig:
        """This config with relative `task_paths` made absolute against `base_dir`."""
        paths = [p if p.is_absolute() else (base_dir / p).resolve() for p in self.task_paths]
        return self.model_copy(update={"task_paths": paths})


PUBLIC_BENCHMARKS = (
    "mmlu",
    "gsm8k",
    "hellaswag",
    "arc_",
    "truthfulqa",
    "winogrande",
    "piqa",
    "boolq",
    "openbookqa",
    "siqa",
    "social_iqa",
    "lambada",
    "bbh",
    "gpqa",
    "ifeval",
    "math",
    "minerva_math",
    "humaneval",
    "mbpp",
    "drop",
    "race",
    "sciq",
    "commonsense_qa",
    "leaderboard",
    "mmlu_pro",
    "musr",
    "anli",
    "triviaqa",
    "nq_open",
    "squad",
    "copa",
    "super_glue",
    "glue",
    "agieval",
)
"""Task names (or prefixes, for families like `mmlu_*` and `arc_*`) of lm-eval's well-known
public benchmarks: leaderboard test sets a merge must not be tuned on."""


def is_public_benchmark(task: str) -> bool:
    name = task.lower()
    return any(
        name == p or name.startswith(p if p.endswith("_") else p + "_") for p in PUBLIC_BENCHMARKS
    )


def combine(specs: list[TaskSpec], per_task: dict[str, float], maximize: dict[str, bool]) -> float:
    """Weighted mean of the task metrics, minimised ones negated: larger is always better."""
    total = sum(s.weight for s in specs)
    signed = sum(
        s.weight * (per_task[s.name] if maximize[s.name] else -per_task[s.name]) for s in specs
    )
    return signed / total
