"""`evomerge report`: what a search found, as a table, three plots and `summary.json`.

Everything is read from the study in Optuna storage and the gene list in `run.json`; no model
(and no torch) is loaded and the pool need not exist any more. `report_run(run_dir)` writes,
into `RUN_DIR/report/` (or `out`):

- `history.png`   fitness per trial (filled: all of dev, hollow: stopped early), the
                  running best, failed trials as crosses, each baseline as a labelled line;
- `genome.png`    the best trial's genome as a heat map: one row per parameter x model
                  (x split part), one column per layer group, colour = position within the
                  gene's bounds, the value written in the cell;
- `tasks.png`     per-task scores of the best trial beside each baseline;
- `summary.json`  the table data: best trial, top trials (full evaluations first), baselines,
                  counts, saving, and the held-out scores below.

Held-out scores: the best trial and the best baseline are scored again on every dev example
and on the test split (`evomerge.results.heldout`; this loads the pool once, and the result
is cached in RUN_DIR/heldout/), with bootstrap standard errors per task and a paired
comparison of the two on the same examples. The search never saw those test scores. A
report whose pool has gone says so and shows the search's scores only.

"Best" is `study.best_trial`, the trial `evomerge export` takes: the best full-fidelity
trial (subset scores are noisier), or of a multi-objective study's Pareto front the one with
the best combined fitness.

The multi-fidelity saving counts examples: each trial records how many it scored (every rung
together, `evomerge.search.fidelity`), against as many per trial as a full-fidelity trial scores.
Each trial's per-example scores are in RUN_DIR/examples/<trial>.json.

For an interactive view (history, parameter importances, slices, per-trial attributes), open
the same study in optuna-dashboard while the search runs or after::

    pip install optuna-dashboard
    optuna-dashboard sqlite:///RUN_DIR/study.db

(an absolute RUN_DIR gives four slashes, `sqlite:////abs/run/study.db`; a run with
`search.storage` set uses that URL instead; the report prints the exact command).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import UserError

if TYPE_CHECKING:
    import optuna

    from evomerge.search.run_folder import RunGenes

LOG = logging.getLogger(__name__)

PLOTS = ("history.png", "genome.png", "tasks.png")


@dataclass
class Report:
    text: str  # the terminal table
    summary: dict[str, Any]  # what summary.json holds
    files: list[Path] = field(default_factory=list)


# --- entry points --------------------------------------------------------------------------
def report_run(run_dir: str | Path, *, top: int = 10, out: Path | None = None) -> Report:
    """Report on the run folder `run_dir`; files go to `out` (default `RUN_DIR/report`)."""
    from evomerge.search.run_folder import read_run_folder, read_run_genes
    from evomerge.search.study import open_storage, open_study, storage_url

    run_dir = Path(run_dir)
    config = read_run_folder(run_dir, check_pool=False)
    url = storage_url(config, run_dir)
    study = open_study(config, open_storage(url))
    out_dir = Path(out) if out else run_dir / "report"
    return make_report(
        study,
        read_run_genes(run_dir),
        out_dir,
        top=top,
        title=str(run_dir),
        dashboard=f"optuna-dashboard {url}",
        held_out=held_out_scores(config, run_dir, study),
    )


def held_out_scores(config, run_dir: Path, study: optuna.Study) -> dict[str, Any] | None:
    """The best trial and the best baseline on all of dev and on test (None: nothing to score)."""
    from evomerge.results.heldout import chosen_scores
    from evomerge.search.study import best_trial

    best = best_trial(study)
    return chosen_scores(config, run_dir, study, best) if best is not None else None


def make_report(
    study: optuna.Study,
    genes: RunGenes,
    out_dir: Path,
    *,
    top: int = 10,
    title: str = "",
    dashboard: str | None = None,
    held_out: dict[str, Any] | None = None,
) -> Report:
    """Table, plots and summary.json for `study`, whose genes are `genes`.

    `title` names the run in the text; `dashboard` is the command that opens the study in
    optuna-dashboard, shown in the text and kept in summary.json; `held_out` is what
    `held_out_scores` found, shown after the table."""
    if top < 1:
        raise UserError(f"--top must be at least 1, not {top}")
    summary = summarise(study, top=top)
    if summary["best"] is None:
        where = f" of {title}" if title else ""
        raise UserError(
            f"the study{where} has no completed trial yet; run or resume the search first"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    best = next(
        t for t in study.get_trials(deepcopy=False) if t.number == summary["best"]["number"]
    )
    files = [
        plot_history(study, summary, out_dir / "history.png"),
        plot_genome(genes, best, out_dir / "genome.png"),
        plot_tasks(summary, out_dir / "tasks.png"),
    ]
    summary["plots"] = [f.name for f in files]
    if dashboard:
        summary["dashboard"] = dashboard
    if held_out is not None:
        summary["held_out"] = held_out
    files.append(_write_json(out_dir, summary))
    text = format_table(summary, title=title)
    if held_out is not None:
        text += "\n\n" + format_held_out(held_out)
    if dashboard:
        text += f"\ndashboard: {dashboard}"
    text += "\n" + "\n".join(f"wrote {f}" for f in files)
    return Report(text=text, summary=summary, files=files)


# --- the data --------------------------------------------------------------------------------
def _finite(value: Any) -> float | None:
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
        "fitness": _finite(attrs.get("fitness")),
        "per_task": {k: _finite(v) for k, v in (attrs.get("per_task") or {}).items()},
        "eval_seconds": _finite(attrs.get("eval_seconds")),
    }
    if "fail_reason" in attrs:
        row["fail_reason"] = attrs["fail_reason"]
    return row


def _baseline_trials(trials) -> list:
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
    """The table data: best trial, top `top` trials (full evaluations first, then by fitness),
    baselines, counts, saving."""
    from optuna.trial import TrialState

    from evomerge.search.study import best_trial

    trials = study.get_trials(deepcopy=False)
    complete = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE and _finite(t.user_attrs.get("fitness")) is not None
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
        "baselines": [_row(t) for t in _baseline_trials(trials)],
        "counts": {
            "trials": len(trials),
            "complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "failed": sum(t.state == TrialState.FAIL for t in trials),
            "running": sum(t.state == TrialState.RUNNING for t in trials),
            "full_evaluations": sum(t.user_attrs.get("fidelity") == "full" for t in complete),
            "subset_only": sum(t.user_attrs.get("fidelity") == "subset" for t in complete),
        },
        "multi_fidelity": multi_fidelity_saving(complete),
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


# --- the table -------------------------------------------------------------------------------
def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _cells(rows: list[dict[str, Any]], tasks: list[str], marks: dict[int, str]) -> list[list[str]]:
    """Header and one line of cells per row."""
    header = ["", "#", "baseline", "fidelity", "fitness", *tasks]
    return [header] + [
        [
            marks.get(r["number"], ""),
            str(r["number"]),
            r["baseline"] or "",
            r["fidelity"] or ("failed" if r["state"] == "FAIL" else r["state"].lower()),
            _num(r["fitness"]),
            *(_num(r["per_task"].get(task)) for task in tasks),
        ]
        for r in rows
    ]


def _aligned(tables: list[list[list[str]]]) -> list[list[str]]:
    """Each table as text lines, with the same column widths across all of them."""
    lines = [line for table in tables for line in table]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    left = {0, 2, 3}  # text columns; numbers align right
    return [
        [
            "  ".join(
                c.ljust(w) if i in left else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths))
            ).rstrip()
            for line in table
        ]
        for table in tables
    ]


def format_table(summary: dict[str, Any], *, title: str = "") -> str:
    """The terminal report: top trials, baselines, counts, multi-fidelity saving."""
    tasks, counts = summary["tasks"], summary["counts"]
    best = summary["best"]
    marks = {n: "p" for n in summary["pareto_front"]}
    marks[best["number"]] = "*"
    lines = [
        f"study {summary['study']!r}"
        + (f" in {title}" if title else "")
        + f": {counts['trials']} trials"
    ]
    top_lines, baseline_lines = _aligned(
        [_cells(summary["top"], tasks, marks), _cells(summary["baselines"], tasks, marks)]
    )
    lines += [
        "",
        f"top {len(summary['top'])} of {counts['complete']} complete trials by fitness"
        + (", full evaluations first" if counts["subset_only"] else ""),
        *top_lines,
    ]
    legend = "* the trial `evomerge export` takes"
    legend += (
        " (best full evaluation)" if len(summary["directions"]) == 1 else "; p on the Pareto front"
    )
    lines.append(legend)
    if summary["baselines"]:
        lines += ["", "baselines", *baseline_lines]
        scored = [b for b in summary["baselines"] if b["fitness"] is not None]
        if best["baseline"]:
            lines.append(
                f"the best trial is the baseline {best['baseline']}; the search has not beaten it"
            )
        elif scored:
            rival = max(scored, key=lambda b: b["fitness"])
            gap = best["fitness"] - rival["fitness"]
            lines.append(f"best trial vs best baseline ({rival['baseline']}): {gap:+.4f} fitness")
    running = f", {counts['running']} running" if counts["running"] else ""
    done = f"{counts['complete']} complete, {counts['failed']} failed"
    lines += ["", f"{done}, {counts['full_evaluations']} full evaluations{running}"]
    saving = summary["multi_fidelity"]
    if saving["subset_only_fraction"] is not None:
        scored_n = counts["subset_only"] + counts["full_evaluations"]
        line = (
            f"multi-fidelity: {counts['subset_only']} of {scored_n} trials "
            f"({saving['subset_only_fraction']:.0%}) stopped before all of dev"
        )
        if saving["examples_scored"] is not None:
            spent, full = saving["examples_scored"], saving["examples_full_fidelity"]
            line += f"; {spent} of {full} examples scored ({full / max(spent, 1):.1f}x fewer)"
        else:
            line += " (no example counts recorded: saving unknown)"
        lines.append(line)
    return "\n".join(lines)


# --- held-out scores ---------------------------------------------------------------------------
def _with_error(value: float | None, se: float | None) -> str:
    if _finite(value) is None:
        return "-"
    return f"{value:.4f}" + (f" ± {se:.4f}" if _finite(se) is not None else "")


def format_held_out(scores: dict[str, Any]) -> str:
    """The chosen trials on all of dev and on test, ± bootstrap standard errors, and the
    paired difference of the best trial and the best baseline."""
    if "unavailable" in scores:
        return f"held-out scores: not computed: {scores['unavailable']}"
    tasks = list(scores["trials"][0]["dev"]["per_task"])
    rows = [["", "split", "fitness", *tasks]]
    label = lambda trial: (
        f"#{trial['number']}" + (f" (baseline {trial['baseline']})" if trial["baseline"] else "")
    )
    for trial in scores["trials"]:
        for split in ("dev", "test"):
            part = trial[split]
            rows.append(
                [label(trial) if split == "dev" else "", split, _num(part["value"])]
                + [_with_error(part["per_task"][t], part["se"].get(t)) for t in tasks]
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["scores on every example (± bootstrap standard error), dev chose, test held out"]
    lines += [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in rows
    ]
    single = [t for t, held in scores["held_out"].items() if not held]
    if single:
        lines.append(
            f"no held-out split: {', '.join(single)} (one split; its test score is on the examples "
            "the search chose on)"
        )
    paired = scores.get("paired")
    if paired:
        best, rival = scores["trials"][0], scores["trials"][1]
        parts = [
            f"{split} {p['difference']:+.4f} ± {p['se']:.4f} (no gain in {p['p_not_better']:.1%} of resamples)"
            for split, p in paired.items()
            if p is not None and None not in p.values()
        ]
        lines.append(f"{label(best)} - {label(rival)}, paired: " + "; ".join(parts))
    return "\n".join(lines)


# --- plots -----------------------------------------------------------------------------------
def _figure(width: float, height: float):
    """A figure on the Agg canvas, without pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    """Write to a temporary file, then rename: a reader never sees half a PNG."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _write_json(out_dir: Path, summary: dict[str, Any]) -> Path:
    path = Path(out_dir) / "summary.json"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".summary.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(summary, f, indent=2, allow_nan=False)
    os.replace(tmp, path)
    return path


def _spread(ys: list[float], gap: float) -> list[float]:
    """Label heights moved apart by at least `gap`, keeping their order."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    out = list(ys)
    for prev, i in itertools.pairwise(order):
        out[i] = max(out[i], out[prev] + gap)
    return out


def _colours(summary: dict[str, Any]) -> dict[str, str]:
    """One colour per baseline label, the same in every plot (C0, C1 are the trials')."""
    return {b["baseline"]: f"C{(i + 2) % 10}" for i, b in enumerate(summary["baselines"])}


def plot_history(study: optuna.Study, summary: dict[str, Any], path: Path) -> Path:
    """Fitness per trial, running best, failed trials, and baselines as labelled lines."""
    from optuna.trial import TrialState

    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    scored = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE and _finite(t.user_attrs.get("fitness")) is not None
    ]
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    for fidelity, style in (
        ("full", {"color": "C0", "label": "full evaluation"}),
        ("subset", {"facecolors": "none", "edgecolors": "C0", "label": "stopped early"}),
    ):
        pts = [
            (t.number, t.user_attrs["fitness"])
            for t in scored
            if (t.user_attrs.get("fidelity") or "full") == fidelity
        ]
        if pts:
            ax.scatter(*zip(*pts), s=28, zorder=3, **style)

    # running best over the trials `best_trial` chooses among: full ones if there are any
    pool = [t for t in scored if t.user_attrs.get("fidelity") == "full"] or scored
    xs, ys, best = [], [], -math.inf
    for t in pool:
        best = max(best, t.user_attrs["fitness"])
        xs.append(t.number)
        ys.append(best)
    if xs:
        xs.append(trials[-1].number)
        ys.append(best)
        label = "running best (full)" if pool is not scored else "running best"
        ax.step(xs, ys, where="post", color="C1", lw=1.8, label=label, zorder=2)

    x_max = trials[-1].number if trials else 0
    baselines = [b for b in summary["baselines"] if b["fitness"] is not None]
    colours = _colours(summary)
    for b in baselines:  # lines stop short of the right margin, which holds their labels
        ax.hlines(
            b["fitness"],
            -0.5,
            x_max + 0.5,
            color=colours[b["baseline"]],
            ls="--",
            lw=1,
            alpha=0.8,
            zorder=1,
        )

    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    if failed:  # at the foot of the axes: a failed trial has no fitness
        ax.scatter(
            failed,
            [0.02] * len(failed),
            marker="x",
            color="black",
            s=30,
            label="failed",
            transform=ax.get_xaxis_transform(),
            zorder=3,
            clip_on=False,
        )

    ax.set_xlim(-0.5, x_max + 0.5 + max(1.0, 0.18 * (x_max + 1)))  # room for baseline labels
    low, high = ax.get_ylim()
    heights = _spread([b["fitness"] for b in baselines], 0.045 * (high - low))
    for b, y in zip(baselines, heights):
        ax.annotate(
            b["baseline"],
            xy=(x_max + 0.6, b["fitness"]),
            xytext=(x_max + 0.9, y),
            fontsize=8,
            va="center",
            color=colours[b["baseline"]],
            arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6}
            if abs(y - b["fitness"]) > 1e-12
            else None,
        )
    ax.set_ylim(low, max(high, heights[-1] if heights else high))
    ax.set_xlabel("trial")
    ax.set_ylabel("fitness (combined, higher is better)")
    ax.set_title(f"optimisation history: {summary['study']}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    return _save(fig, path)


def _stage_prefix(gene: dict) -> str:
    """`S1` for a pairwise stage's gene `S1.L0-1.t`; empty for a gene named from its group."""
    return (
        gene["name"].split(f"{gene['group']}.", 1)[0].rstrip(".")
        if f"{gene['group']}." in gene["name"]
        else ""
    )


def plot_genome(genes: RunGenes, trial, path: Path) -> Path:
    """Heat map of a trial's genome: rows parameter x model (x part), columns layer groups."""
    import numpy as np

    groups = list(genes.groups)
    floats = [g for g in genes.genes if not g.get("choices")]
    # categorical genes: a group's (its method) under the group's label, the others in the title
    chosen = {
        g["group"]: trial.params.get(g["name"])
        for g in genes.genes
        if g.get("choices") and g["group"] in groups
    }
    others = [
        f"{g['name']} {trial.params.get(g['name'])}"
        for g in genes.genes
        if g.get("choices") and g["group"] not in groups
    ]
    rows: list[
        tuple[str, str | None, str | None, str]
    ] = []  # (param, model, part, stage), param-major
    for gene in floats:
        key = (gene["param"], gene["model"], gene["part"], _stage_prefix(gene))
        if key not in rows:
            rows.append(key)
    params = list(dict.fromkeys(gene["param"] for gene in floats))
    rows.sort(key=lambda k: params.index(k[0]))  # stable: keeps model order
    values = np.full((len(rows), len(groups)), np.nan)
    shade = np.full_like(values, np.nan)  # position within the gene's bounds, 0..1
    for gene in floats:
        value = trial.params.get(gene["name"])
        if value is None:
            continue
        r = rows.index((gene["param"], gene["model"], gene["part"], _stage_prefix(gene)))
        values[r, groups.index(gene["group"])] = value
        shade[r, groups.index(gene["group"])] = (value - gene["low"]) / (gene["high"] - gene["low"])

    labels = [
        " · ".join(x for x in (stage, model, part, param) if x)
        for param, model, part, stage in rows
    ]
    fig = _figure(2.2 + 0.75 * len(groups) + 0.06 * max(map(len, labels)), 1.4 + 0.38 * len(rows))
    ax = fig.add_subplot()
    image = ax.imshow(shade, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    if values.size <= 600:  # beyond that the numbers are unreadable anyway
        size = 8 if len(groups) <= 12 else 6
        for (r, c), value in np.ndenumerate(values):
            if not np.isnan(value):
                ax.text(
                    c,
                    r,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=size,
                    color="black" if shade[r, c] > 0.6 else "white",
                )
    for r in range(1, len(rows)):  # a rule between parameters
        if rows[r][0] != rows[r - 1][0]:
            ax.axhline(r - 0.5, color="white", lw=2)
    ticks = [f"{g}\n{chosen[g]}" if g in chosen else g for g in groups]
    ax.set_xticks(range(len(groups)), ticks, rotation=45 if len(groups) > 8 else 0)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_xlabel("layer group")
    fitness = _finite(trial.user_attrs.get("fitness"))
    ax.set_title(
        f"genome of trial #{trial.number} ({genes.method}"
        + (f", fitness {fitness:.4f})" if fitness is not None else ")")
        + "".join(f"\n{other}" for other in others),
        fontsize=10,
    )
    fig.colorbar(image, ax=ax, label="position within bounds (low → high)", shrink=0.9)
    return _save(fig, path)


def plot_tasks(summary: dict[str, Any], path: Path) -> Path:
    """Grouped bars per task: the best trial beside each baseline."""
    import numpy as np

    tasks = summary["tasks"]
    best = summary["best"]
    series = [(f"best #{best['number']}", best)] + [
        (b["baseline"], b)
        for b in summary["baselines"]
        if b["fitness"] is not None and b["number"] != best["number"]
    ]
    if best["baseline"]:  # the best trial is itself a baseline
        series[0] = (f"best #{best['number']} ({best['baseline']})", best)
    colours = _colours(summary)
    width = 0.8 / len(series)
    fig = _figure(max(5.0, 1.2 + len(tasks) * (0.4 + 0.28 * len(series))), 4.2)
    ax = fig.add_subplot()
    x = np.arange(len(tasks))
    for i, (label, row) in enumerate(series):
        heights = [row["per_task"].get(task) for task in tasks]
        heights = [np.nan if h is None else h for h in heights]
        bars = ax.bar(
            x + (i - (len(series) - 1) / 2) * width,
            heights,
            width,
            label=label,
            color="C1" if i == 0 else colours[row["baseline"]],
            edgecolor="black" if i == 0 else "none",
            lw=0.8,
        )
        if len(series) * len(tasks) <= 40:
            ax.bar_label(bars, fmt="%.2f", fontsize=6.5, padding=1)
    ax.set_xticks(x, tasks, rotation=20 if len(tasks) > 4 else 0)
    ax.set_ylabel("score (each task's metric)")
    ax.set_title("per-task scores: best trial vs baselines")
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)
