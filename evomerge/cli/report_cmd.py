"""`evomerge report RUN_DIR`: the best trials, baselines, plots and summary.json of a search,
and unless `--no-held-out` the chosen trials' held-out scores (the one step that loads a model)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--top", default=10, show_default=True, type=click.IntRange(min=1), help="Trials in the table."
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder for the plots and summary.json (default: RUN_DIR/report).",
)
@click.option(
    "--held-out/--no-held-out",
    default=True,
    show_default=True,
    help="Score the best trial and the best baseline on all of dev and on test (loads the model).",
)
def report(run_dir: Path, top: int, out: Path | None, held_out: bool) -> None:
    """Summarise the search in RUN_DIR: a table of the best trials against the baselines,
    history / genome / per-task plots and summary.json, read from the study alone.

    Then, unless --no-held-out, score the best trial and the best baseline again on every dev
    and test example: this loads the pool's base model and every fine-tune once (announced
    before it starts), caches the scores in RUN_DIR/heldout/ so the next report loads nothing,
    and is skipped, with a note, when the pool is no longer on disk. With --no-held-out no
    model is loaded, nor torch."""
    from evomerge.cli.process import quiet_output, set_up_process
    from evomerge.search.run_folder import read_run_folder

    set_up_process()
    from evomerge.results.report import report_run

    read_run_folder(run_dir, check_pool=False)  # a bad folder is refused before the log is written
    from evomerge.io.output import check_writable

    check_writable(out or run_dir / "report", "the report")  # before any held-out scoring
    if not held_out:  # no library will print, and quiet_output would import transformers
        click.echo(report_run(run_dir, top=top, out=out, held_out=False).text)
        return
    with quiet_output(run_dir) as terminal:

        def say(line: str) -> None:  # on the terminal: the log file takes stderr in this block
            click.echo(f"{line} (--no-held-out skips this)", file=terminal)

        text = report_run(run_dir, top=top, out=out, say=say).text
    click.echo(text)


commands = (report,)
