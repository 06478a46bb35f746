"""`evomerge report RUN_DIR`: the best trials, baselines, plots and summary.json of a search."""

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
def report(run_dir: Path, top: int, out: Path | None) -> None:
    """Summarise the search in RUN_DIR: a table of the best trials against the baselines,
    history / genome / per-task plots and summary.json. Loads no model."""
    from evomerge.cli.process import quiet_output, set_up_process
    from evomerge.search.run_folder import read_run_folder

    set_up_process()
    from evomerge.results.report import report_run

    read_run_folder(run_dir, check_pool=False)  # a bad folder is refused before the log is written
    with quiet_output(run_dir):
        text = report_run(run_dir, top=top, out=out).text
    click.echo(text)


commands = (report,)
