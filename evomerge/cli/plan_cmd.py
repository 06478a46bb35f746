"""`evomerge plan CONFIG`: the memory a search would hold, from headers only, before anything
loads (evomerge/search/memory_plan.py)."""

import sys
from pathlib import Path

import click


@click.command("plan")
@click.argument("config_path", metavar="CONFIG.yaml", type=click.Path(path_type=Path))
@click.option(
    "--memory",
    help="Memory the device has for the search, e.g. 80GB (default: what it has free now).",
)
@click.option(
    "--host-memory",
    help="Host memory for the host tier's inputs, e.g. 256GB (default: what it has available).",
)
@click.option(
    "--bandwidth/--no-bandwidth",
    default=True,
    help="Measure this machine's copy bandwidth for an expected merge time (default: on).",
)
def command(
    config_path: Path, memory: str | None, host_memory: str | None, bandwidth: bool
) -> None:
    """Print what a search over CONFIG.yaml would hold on its device (the base, the task
    vectors, the method's extras, the live model, an activation allowance) and the bytes one
    trial moves, read from the pool's safetensors headers: no tensor is loaded. In the host
    tier (`search.tier`, auto where the device tier does not fit a GPU) also what host memory
    holds and what a trial copies over the host link. Exit 2 if it fits no tier."""
    from evomerge.io.output import parse_size
    from evomerge.search.config import load_run_config
    from evomerge.search.memory_plan import plan_memory

    config = load_run_config(config_path)
    plan = plan_memory(
        config,
        memory=parse_size(memory) if memory is not None else None,
        host_memory=parse_size(host_memory) if host_memory is not None else None,
        measure_bandwidth=bandwidth,
    )
    for line in plan.lines():
        click.echo(line)
    if not plan.fits:
        sys.exit(2)
