"""`evomerge pool demo|demo2|demo3|demo-lora OUT_DIR`: build an offline pool (base + specialists
+ tasks)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

log = logging.getLogger(__name__)

SIZE_HELP = (
    "full: the pool itself (a minute or two on 1 thread); small: a seconds-long build for tests."
)


@click.group(name="pool")
def command() -> None:
    """Model pools to merge."""


def _build(name: str, out_dir: Path, size: str, force: bool) -> None:
    from evomerge.cli.process import set_up_process
    from evomerge.io.output import check_writable

    check_writable(out_dir, "the pool")  # before the build, not after it
    set_up_process()
    from evomerge.pool import build_pool, load_manifest

    if name.endswith("-lora"):
        from evomerge.pool.lora import build_lora_pool

        manifest = build_lora_pool(out_dir, name=name.removesuffix("-lora"), size=size, force=force)
    else:
        manifest = build_pool(out_dir, name=name, size=size, force=force)
    click.echo(f"built the {size} {name} pool in {manifest['seconds']['total']:.0f} s: {out_dir}")
    for model, reference in load_manifest(out_dir)["models"].items():
        click.echo(f"  {model:<6} {reference}")
    click.echo(
        f"  tasks  {out_dir / manifest['task_path']}  ({', '.join(manifest['tasks'])}; "
        "split dev for the search, test for reports)"
    )


def _pool_command(name: str, summary: str) -> click.Command:
    """One `evomerge pool NAME OUT_DIR` command; the pools differ only in their skills."""

    @click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
    @click.option(
        "--size",
        type=click.Choice(["small", "full"]),
        default="full",
        show_default=True,
        help=SIZE_HELP,
    )
    @click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
    def build(out_dir: Path, size: str, force: bool) -> None:
        _build(name, out_dir, size, force)

    build.__doc__ = (
        f"Build the {name} pool into OUT_DIR, offline: {summary}\n\n"
        "A tiny base model and one specialist per synthetic skill. Writes OUT_DIR/base, "
        "OUT_DIR/<skill> (HF folders; PEFT adapter folders in demo-lora), OUT_DIR/tasks "
        "(lm-eval tasks with held-out dev and test data) and OUT_DIR/pool.json. "
        "Deterministic: the same command gives the same pool."
    )
    return command.command(name=name)(build)


demo = _pool_command("demo", "add, rev, sort (loglikelihood tasks scored by acc).")
demo2 = _pool_command(
    "demo2",
    "shift (a Caesar cipher, a generate-until task scored by exact_match), sub, dedup "
    "(loglikelihood tasks scored by acc).",
)
demo3 = _pool_command(
    "demo3",
    "add, dedup (loglikelihood, acc) and shift (generate-until, exact_match); the pool held out "
    "from every choice of a default, for reports.",
)
demo_lora = _pool_command(
    "demo-lora",
    "the demo base (the same as `evomerge pool demo`'s) and one PEFT LoRA adapter per skill "
    "(add, rev, sort), each a specialist `base+<skill>`.",
)
