"""`evomerge export RUN_DIR OUT_DIR`: the best (or a chosen) trial as recipe + model."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option(
    "--trial", "trial_number", type=int, help="Trial number (default: the best, see README)."
)
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
def export(run_dir: Path, out_dir: Path, trial_number: int | None, force: bool) -> None:
    """Write a trial's recipe (mergekit YAML) and merged model (HF folder) to OUT_DIR."""
    from evomerge.cli.process import quiet_output, set_up_process
    from evomerge.search.run_folder import read_run_folder

    set_up_process()
    from evomerge.results.export import export_trial

    read_run_folder(run_dir, check_pool=False)  # a bad folder is refused before the log is written
    from evomerge.io.output import check_output_folder

    check_output_folder(out_dir, force=force)  # before the held-out scoring, not after it
    with quiet_output(run_dir):
        summary = export_trial(
            run_dir, out_dir, trial_number=trial_number, force=force, say=click.echo
        )
    click.echo(
        f"exported {summary.tensors} tensors in {summary.seconds:.1f} s -> {out_dir} "
        f"(recipe: {out_dir / 'recipe.yaml'})"
    )


commands = (export,)
