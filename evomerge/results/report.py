"""`evomerge report`: what a search found, as a table, three plots and `summary.json`.

`report_run(run_dir)` reads the study in Optuna storage and the gene list in `run.json` and
writes, into `RUN_DIR/report/` (or `out`), the figures of `results.plots` and `summary.json`
(the data of `results.summary`); it returns them with the terminal text (`results.table`).
Reading the study loads no model and no torch, and the pool need not exist any more.

Held-out scores are the one part that loads the model: unless `held_out=False`, the best
trial and the best baseline are scored again on every dev and test example
(`results.heldout.chosen_scores`: the pool is loaded once, after `say` has announced it, and
the result is cached in RUN_DIR/heldout/, so a second report loads nothing). They are shown
after the table and kept in summary.json under `held_out`; a report whose pool has gone says
so and shows the search's scores only. The search never saw those test scores.

"Best" is `study.best_trial`, the trial `evomerge export` takes: the best full-fidelity
trial (subset scores are noisier), or of a multi-objective study's Pareto front the one with
the best combined fitness. The multi-fidelity saving counts examples: each trial records how
many it scored (every rung together, `evomerge.search.fidelity`), against as many per trial as
a full-fidelity trial scores. Each trial's per-example scores are in RUN_DIR/examples/.

For an interactive view (history, parameter importances, slices, per-trial attributes), open
the same study in optuna-dashboard while the search runs or after::

    pip install optuna-dashboard
    optuna-dashboard sqlite:///RUN_DIR/study.db

(an absolute RUN_DIR gives four slashes, `sqlite:////abs/run/study.db`; a run with
`search.storage` set uses that URL instead; the report prints the exact command).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import UserError
from evomerge.results.plots import plot_genome, plot_history, plot_tasks
from evomerge.results.summary import summarise, write_summary
from evomerge.results.table import format_held_out, format_table

if TYPE_CHECKING:
    import optuna

    from evomerge.search.run_folder import RunGenes


@dataclass
class Report:
    text: str  # the terminal table
    summary: dict[str, Any]  # what summary.json holds
    files: list[Path] = field(default_factory=list)


def report_run(
    run_dir: str | Path,
    *,
    top: int = 10,
    out: Path | None = None,
    held_out: bool = True,
    say: Callable[[str], Any] = lambda text: None,
) -> Report:
    """Report on the run folder `run_dir`; files go to `out` (default `RUN_DIR/report`).

    With `held_out`, the chosen trials are also scored on all of dev and on test, which loads
    the model unless the scores are cached or the pool is gone; `say` gets one line before it
    loads. Without it, no model, torch or lm-eval is imported."""
    from evomerge.search.run_folder import read_run_folder, read_run_genes
    from evomerge.search.study import open_storage, open_study, storage_url

    run_dir = Path(run_dir)
    config = read_run_folder(run_dir, check_pool=False)
    url = storage_url(config, run_dir)
    study = open_study(config, open_storage(url))
    return make_report(
        study,
        read_run_genes(run_dir),
        Path(out) if out else run_dir / "report",
        top=top,
        title=str(run_dir),
        dashboard=f"optuna-dashboard {url}",
        held_out=held_out_scores(config, run_dir, study, say=say) if held_out else None,
    )


def held_out_scores(
    config, run_dir: Path, study: optuna.Study, *, say: Callable[[str], Any]
) -> dict[str, Any] | None:
    """The best trial and the best baseline on all of dev and on test (None: nothing to score)."""
    from evomerge.results.heldout import chosen_scores
    from evomerge.search.study import best_trial

    best = best_trial(study)
    return chosen_scores(config, run_dir, study, best, say=say) if best is not None else None


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
    """Table, plots and summary.json for `study`, whose genes are `genes`; a `UserError`
    before anything is written when no trial has completed.

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
    zeros = _all_zero_tasks(study)
    if zeros:
        summary["all_zero_tasks"] = zeros
    files.append(write_summary(out_dir, summary))
    text = format_table(summary, title=title)
    if zeros:
        from evomerge.fitness.zeros import zero_warning

        text += "\nwarning: " + zero_warning(zeros, who="every trial scored")
    if held_out is not None:
        text += "\n\n" + format_held_out(held_out)
    if dashboard:
        text += f"\ndashboard: {dashboard}"
    text += "\n" + "\n".join(f"wrote {f}" for f in files)
    return Report(text=text, summary=summary, files=files)


def _all_zero_tasks(study: optuna.Study) -> list[str]:
    """Tasks on which every completed trial scored exactly 0 (a format problem, not a merge)."""
    from optuna.trial import TrialState

    from evomerge.fitness.zeros import all_zero_tasks

    rows = [
        t.user_attrs.get("per_task") or {}
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ]
    return all_zero_tasks(rows, {})  # an exact 0 of a minimised metric (perplexity) never occurs
