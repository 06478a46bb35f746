"""The report's data: what a study's trials say, as the plain dict `summary.json` holds.

Read from the trials' user attributes only (no model, no torch). "Best" is
`evomerge.search.study.best_trial`, the trial `evomerge export` takes. Every score is a finite
float or None: a NaN never reaches the JSON, the table or the plots.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.io.output import write_text_atomic

if TYPE_CHECKING:
    import optuna


def finite(value: Any) -> float | None:
    """A float for JSON and arithmetic, or None (never NaN flowing on)."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _row(trial) -> dict[str, Any]:
    attrs = trial.user_attrs
    row = {
        "number": trial.number,
        "state": trial.state.name,
        "baseline": attrs.get("baseline"),
        "fidelity": attrs.get("fidelity"),
        "fitness": finite(attrs.get("fitness")),
        "per_task": {k: finite(v) for k, v in (attrs.get("per_task") or {}).items()},
        "eval_seconds": finite(attrs.get("eval_seconds")),
    }
    if "fail_reason" in attrs:
        row["fail_reason"] = attrs["fail_reason"]
    return row


def baseline_trials(trials) -> list:
    """One trial per baseline label: the completed one when a killed baseline was retried
    (the retry carries the same label)."""
    from optuna.trial import TrialState

    chosen: dict[str, object] = {}
    for t in trials:
        label = t.user_attrs.get("baseline")
        if label is not None and (label not in chosen or t.state == TrialState.COMPLETE):
            chosen[label] = t
    return list(chosen.values())


def summarise(study: optuna.Study, *, top: int = 10) -> dict[str, Any]:
    """The table data: best trial (None before any completed one), top `top` trials (full
    evaluations first, then by fitness), Pareto front, baselines, counts, saving."""
    from optuna.trial import TrialState

    from evomerge.search.study import best_trial

    trials = study.get_trials(deepcopy=False)
    complete = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE and finite(t.user_attrs.get("fitness")) is not None
    ]
    best = best_trial(study, trials)
    tasks: list[str] = []
    for t in complete:
        tasks += [k for k in t.user_attrs.get("per_task") or {} if k not in tasks]
    # Full evaluations first: a subset-only score is on fewer examples, and the highest of many
    # such noisy scores overstates its trial (`make demo`: 0.86 on 50 examples a task, where the
    # trial export takes scores 0.82 on all of dev).
    ranked = sorted(
        complete,
        key=lambda t: (
            t.user_attrs.get("fidelity") == "subset",
            -t.user_attrs["fitness"],
            t.number,
        ),
    )
    pareto = (
        {t.number for t in study.best_trials} if len(study.directions) > 1 and complete else set()
    )
    return {
        "study": study.study_name,
        "directions": [d.name.lower() for d in study.directions],
        "tasks": tasks,
        "best": _row(best) if best is not None else None,
        "top": [_row(t) for t in ranked[:top]],
        "pareto_front": sorted(pareto),
        "baselines": [_row(t) for t in baseline_trials(trials)],
        "counts": _counts(trials, complete),
        "multi_fidelity": multi_fidelity_saving(complete),
    }


def _counts(trials, complete) -> dict[str, int]:
    from optuna.trial import TrialState

    return {
        "trials": len(trials),
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "running": sum(t.state == TrialState.RUNNING for t in trials),
        "full_evaluations": sum(t.user_attrs.get("fidelity") == "full" for t in complete),
        "subset_only": sum(t.user_attrs.get("fidelity") == "subset" for t in complete),
    }


def multi_fidelity_saving(trials) -> dict[str, Any]:
    """Fraction of trials stopped before all of dev, and the examples that saved.

    Each trial records the examples it scored (`examples`, every rung together); without
    multi-fidelity every trial would have scored as many as a full-fidelity one does. The
    counts are None where the trials do not record them (older runs)."""
    scored = [t for t in trials if t.user_attrs.get("fidelity") in ("subset", "full")]
    stopped = [t for t in scored if t.user_attrs["fidelity"] == "subset"]
    out: dict[str, Any] = {
        "subset_only_fraction": len(stopped) / len(scored) if scored else None,
        "examples_scored": None,
        "examples_full_fidelity": None,
    }
    counts = [t.user_attrs.get("examples") for t in scored]
    full = [n for t, n in zip(scored, counts) if t.user_attrs["fidelity"] == "full"]
    if scored and full and all(isinstance(n, int) for n in counts):
        out["examples_scored"] = sum(counts)
        out["examples_full_fidelity"] = len(scored) * max(full)
    return out


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    """`summary` as OUT_DIR/summary.json, renamed into place: a reader never sees half of it."""
    path = Path(out_dir) / "summary.json"
    write_text_atomic(path, json.dumps(summary, indent=2, allow_nan=False))
    return path
