"""`evomerge merge RECIPE OUT_DIR`: one classic merge, like mergekit-yaml."""

import gc
import os
from contextlib import contextmanager
from pathlib import Path

import click

from evomerge.cli.process import threads_help


@click.command("merge")
@click.argument("recipe_path", metavar="RECIPE.yaml", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--seed", default=0, show_default=True, help="Seed of DARE/DELLA masks.")
@click.option(
    "--out-dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    help="Cast the output (overrides the recipe's out_dtype).",
)
@click.option("--shard-size", default="5GB", show_default=True, help="Largest shard file.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Allow .bin checkpoints (weights only).")
@click.option("--threads", type=click.IntRange(min=1), help=threads_help())
def command(
    recipe_path, out_dir, device, seed, out_dtype, shard_size, force, allow_pickle, threads
):
    """Merge the models of RECIPE.yaml (mergekit format) into OUT_DIR."""
    from evomerge.io.output import parse_size
    from evomerge.merging.multistage import load_stages

    stages = load_stages(recipe_path)  # one recipe, or mergekit-multi's named stages
    shard_bytes = parse_size(shard_size)

    # Idle OpenMP threads sleep instead of spinning between kernel calls, leaving the cores to
    # the Python code and the writer thread that run in between (OpenMP reads this when torch
    # loads it; a user's own setting wins).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with _objects_kept_from_gc():  # importing torch makes ~180k long-lived objects
        from evomerge.cli import process

        process.set_threads(threads)  # before torch loads: OpenMP reads OMP_NUM_THREADS then
        import torch  # noqa: F401  (loaded here, its objects frozen with the rest)
        from tqdm import tqdm

        from evomerge.merging.multistage import run_stages

    with tqdm(
        total=0, unit="tensor", desc="merging", leave=False, delay=1.0
    ) as bar:  # no bar before a quick error

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        summary = run_stages(
            stages,
            out_dir,
            seed=seed,
            device=device,
            out_dtype=out_dtype,
            shard_bytes=shard_bytes,
            force=force,
            allow_pickle=allow_pickle,
            progress=progress,
        )
    click.echo(
        f"merged {summary.tensors} tensors ({summary.bytes_written / 1e9:.3f} GB written, "
        f"{summary.bytes_read / 1e9:.3f} GB read) in {summary.seconds:.1f} s -> {summary.out_dir}"
    )


@contextmanager
def _objects_kept_from_gc():
    """No cyclic garbage collection while importing, then the imported objects set aside for
    good (gc.freeze): otherwise the collector walks them again and again during the merge."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()
