"""`evomerge pool demo OUT_DIR`: build the offline demo pool (base + specialists + tasks)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

log = logging.getLogger(__name__)


@click.group(name="pool")
def command() -> None:
    """Model pools to merge."""


@command.command(name="demo")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--size",
    type=click.Choice(["small", "full"]),
    default="full",
    show_default=True,
    help="full: the demo pool (a few minutes on 2 cores); small: a seconds-long build for tests.",
)
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
def demo(out_dir: Path, size: str, force: bool) -> None:
    """Train a tiny base model and one specialist per synthetic skill into OUT_DIR, offline.

    Writes OUT_DIR/base, OUT_DIR/<skill> (HF folders), OUT_DIR/tasks (lm-eval tasks with
    held-out data) and OUT_DIR/pool.json. Deterministic: the same command gives the same pool.
    """
    from evomerge.cli.process import set_up_process

    set_up_process()
    from evomerge.pool import build_pool

    manifest = build_pool(out_dir, size=size, force=force)
    click.echo(f"built the {size} demo pool in {manifest['seconds']['total']:.0f} s: {out_dir}")
    for name, rel in manifest["models"].items():
        click.echo(f"  {name:<6} {out_dir / rel}")
    click.echo(f"  tasks  {out_dir / manifest['task_path']}  ({', '.join(manifest['tasks'])})")
