"""The report's three figures, drawn from a summary and the study (matplotlib's Agg canvas).

- `history.png`  fitness per trial (filled: all of dev, hollow: stopped early), the running
                 best, failed trials as crosses, each baseline as a labelled line;
- `genome.png`   a trial's genome as a heat map: one row per parameter x model (x split part,
                 x stage), one column per layer group, colour = position within the gene's
                 bounds, the value written in the cell; categorical genes as labels;
- `tasks.png`    per-task scores of the best trial beside each baseline.

Each file is written under a temporary name and renamed, so a reader never sees half a PNG.
A baseline has one colour in every figure. No model is read: the genome is drawn from the gene
list that `run.json` keeps.
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.results.summary import finite

if TYPE_CHECKING:
    import optuna

    from evomerge.search.run_folder import RunGenes

PLOTS = ("history.png", "genome.png", "tasks.png")


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
        if t.state == TrialState.COMPLETE and finite(t.user_attrs.get("fitness")) is not None
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
    """The merge stage a gene sets (`S1` in a pairwise sequence), as run.json keeps it; empty
    for a gene of no stage of its own."""
    return gene.get("stage") or ""


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
    fitness = finite(trial.user_attrs.get("fitness"))
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
