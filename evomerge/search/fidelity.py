"""Multi-fidelity over examples: asynchronous successive halving inside each trial.

Every task's dev examples are put in one fixed order: the fitness subset first (so rung 0 is
exactly `fitness.subset`), then the rest, shuffled with the subset's seed (or in file order for
`sampling: first`). Rung k scores each task's first `len(subset) * eta**k` examples of that
order; the last rung, reached once one more step would pass every task's size, scores all of
them. Each rung scores only the examples the rung before did not (nothing is scored twice), and
the trial's value at a rung is the tasks' own aggregation over every example scored so far.

A trial goes on to the next rung only while (a) it scores at least what the incumbent (the
best trial scored on all of dev) scored on the same examples, a paired comparison in which what
makes examples easy or hard cancels, and (b) its value is among the top 1/eta of the values
every finished trial reached at that rung (itself included): asynchronous successive halving,
which needs no generations, so it works with any sampler and with many workers. The first trial
at a rung goes on; baselines always go to the end (they are the report's reference points, and
the first incumbent). (b) alone sends too many trials to the end when the sampler concentrates
on good regions (docs/BENCHMARKS.md, multi-fidelity).

A trial stopped early is told to the sampler as COMPLETE with its value at the rung where it
stopped: an unbiased but noisier estimate of its full value (the examples are a random sample).
Telling it PRUNED instead would hide it from the GP sampler, which ignores pruned trials. The
trial `export` takes is always one scored on all of dev (`evomerge.search.study.best_trial`).

    schedule = Schedule.of(config, evaluator.tasks)      # refuses a schedule that cannot be met
    scored = schedule.score(evaluator, peers=trials)     # rung by rung, stops when outranked
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import UserError

if TYPE_CHECKING:
    from evomerge.fitness import Evaluator
    from evomerge.fitness.tasks import TaskSet
    from evomerge.search.config import RunConfig

RUNGS_ATTR = "rungs"  # a trial's combined value at each rung it reached


class NotFinite(ValueError):
    """A rung's value is NaN or infinite: the candidate is broken, no need to score more."""


@dataclass
class Scored:
    """What one trial scored: per task the document indices and their metric values (in the
    order scored), the aggregates over them, and the combined value at each rung reached."""

    docs: dict[str, list[int]] = field(default_factory=dict)
    values: dict[str, list[float]] = field(default_factory=dict)
    per_task: dict[str, float] = field(default_factory=dict)
    rungs: list[float] = field(default_factory=list)
    full: bool = False

    @property
    def value(self) -> float:
        return self.rungs[-1]

    @property
    def examples(self) -> int:
        return sum(map(len, self.docs.values()))


@dataclass(frozen=True)
class Schedule:
    """The examples of each rung, fixed for a run, and the rule that stops a trial."""

    orders: dict[str, list[int]]  # per task: document indices in the order they are scored
    sizes: list[
        dict[str, int]
    ]  # per rung: examples per task scored by the end of it; the last: all
    eta: float

    @classmethod
    def of(cls, config: RunConfig, tasks: TaskSet) -> Schedule:
        """The run's schedule: one rung of all of dev without a subset or with `fidelity: null`.
        A schedule that cannot be met is refused with one sentence."""
        n_docs = dict(tasks.n_docs)
        empty = [name for name, n in n_docs.items() if n == 0]
        if empty:
            raise UserError(
                f"task {empty[0]!r} has no examples in its {config.fitness.dev_split!r} split"
            )
        subset, fidelity = config.fitness.subset, config.search.fidelity
        if subset is None or fidelity is None or tasks.subset is None:
            return cls(
                orders={t: list(range(n)) for t, n in n_docs.items()}, sizes=[n_docs], eta=math.inf
            )
        if subset.count is not None:
            too_small = [t for t, n in n_docs.items() if n < subset.count]
            if too_small:
                name = too_small[0]
                raise UserError(
                    f"fitness.subset.count {subset.count} is more than the {n_docs[name]} "
                    f"{config.fitness.dev_split} examples of {name!r}: the first fidelity rung "
                    "must be a part of every task; lower it, or set search.fidelity: null to score "
                    "every trial on all of dev"
                )
        orders = {
            t: _order(tasks.subset[t], n, subset.sampling, f"{subset.seed}-{t}")
            for t, n in n_docs.items()
        }
        first = {t: len(tasks.subset[t]) for t in n_docs}
        return cls(orders=orders, sizes=rung_sizes(first, n_docs, fidelity.eta), eta=fidelity.eta)

    def score(
        self, evaluator: Evaluator, *, peers: Sequence, incumbent=None, to_the_end: bool = False
    ) -> Scored:
        """Score the live model rung by rung until it falls behind at a rung (`goes_on`) or all
        of dev is scored. `peers`: a scan of the study; `incumbent`: the best full-fidelity
        trial of it, if any; `to_the_end`: no stopping (baselines)."""
        scored = Scored(docs={t: [] for t in self.orders}, values={t: [] for t in self.orders})
        for rung, sizes in enumerate(self.sizes):
            new = {t: self.orders[t][len(scored.docs[t]) : sizes[t]] for t in self.orders}
            for task, values in evaluator.score_examples(new).items():
                scored.docs[task] += new[task]
                scored.values[task] += values
            scored.per_task = {t: evaluator.aggregate(t, v) for t, v in scored.values.items()}
            value = evaluator.value_of(scored.per_task)
            if not math.isfinite(value):
                raise NotFinite(f"the fitness at rung {rung} is not a finite number")
            scored.rungs.append(value)
            last = rung == len(self.sizes) - 1
            if not last and not to_the_end and not self.goes_on(rung, value, peers, incumbent):
                return scored
        scored.full = True
        return scored

    def goes_on(self, rung: int, value: float, peers: Sequence, incumbent=None) -> bool:
        """Whether a trial with `value` at `rung` goes on: it must score at least what the
        incumbent scored on the same examples (a paired comparison: the example noise the two
        share cancels), and be among the best floor(n/eta) of the n values finished trials
        reached at `rung`, itself included (while n < eta, the best: Optuna's
        `SuccessiveHalvingPruner` rule, as a trial cannot wait at a rung for later peers)."""
        if incumbent is not None and value < incumbent.user_attrs[RUNGS_ATTR][rung]:
            return False
        seen = [value] + [
            t.user_attrs[RUNGS_ATTR][rung]
            for t in peers
            if t.state.is_finished() and len(t.user_attrs.get(RUNGS_ATTR) or ()) > rung
        ]
        seen.sort(reverse=True)
        return value >= seen[max(int(len(seen) // self.eta), 1) - 1]


def rung_sizes(first: dict[str, int], n_docs: dict[str, int], eta: float) -> list[dict[str, int]]:
    """Examples per task by the end of each rung: `first * eta**k`, until one more step would
    pass every task's size; then all of them (so the last step is never a sliver)."""
    sizes, scale = [], 1.0
    while any(round(first[t] * scale * eta) <= n for t, n in n_docs.items()):
        rung = {t: min(round(first[t] * scale), n) for t, n in n_docs.items()}
        if not sizes or rung != sizes[-1]:
            sizes.append(rung)
        scale *= eta
    if sizes and sizes[-1] == n_docs:
        return sizes
    return sizes + [dict(n_docs)]


def _order(subset: Sequence[int], n_docs: int, sampling: str, seed: str) -> list[int]:
    """The subset first, then the other examples: in file order, or shuffled by `seed`."""
    chosen = set(subset)
    rest = [i for i in range(n_docs) if i not in chosen]
    if sampling != "first":
        random.Random(f"{seed}-rest").shuffle(rest)
    return list(subset) + rest


# --- per-example scores in the run folder ------------------------------------------------------
EXAMPLES_DIR = "examples"


def write_examples(run_dir: Path, trial_number: int, scored: Scored) -> Path:
    """Keep a trial's per-example scores as `examples/<trial>.json`: per task the document
    indices scored and the metric's value on each. Trial numbers are unique in a study, and the
    file is written whole under a temporary name and renamed, so workers never collide and a
    reader never sees half a file."""
    folder = Path(run_dir) / EXAMPLES_DIR
    folder.mkdir(exist_ok=True)
    path = folder / f"{trial_number}.json"
    data = {t: {"docs": scored.docs[t], "values": scored.values[t]} for t in scored.docs}
    temporary = folder / f".{trial_number}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps({"trial": trial_number, "tasks": data}, separators=(",", ":")))
    os.replace(temporary, path)
    return path


def read_examples(run_dir: Path, trial_number: int) -> dict[str, dict[str, list[Any]]] | None:
    """A trial's per-example scores (`{task: {"docs": [...], "values": [...]}}`), or None if
    the run folder keeps none for it."""
    path = Path(run_dir) / EXAMPLES_DIR / f"{trial_number}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["tasks"]
