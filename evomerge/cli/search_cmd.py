"""`evomerge search | resume | worker`: run, continue or join a study."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from evomerge.cli.process import threads_help

_threads = click.option("--threads", type=click.IntRange(min=1), help=threads_help(config_key=True))
"""This process's CPU threads, by the one rule of every command (`cli.process.resolve_threads`)."""


def _set_up(config, run_dir: Path, threads: int | None) -> None:
    """The process settings of a search, made before torch or lm-eval load (`threads`: the
    command line's, which wins over the config's)."""
    from evomerge.cli.process import set_up_process

    set_up_process(
        threads=threads,
        config_threads=config.threads,
        hf_home=run_dir / "hf",
        offline=config.fitness.offline,
    )
    from evomerge.merging.executor import check_device

    check_device(config.device)  # the config's, or `worker --device`: before any set-up work


def _output(run_dir: Path):
    """Quiet unless `-v`: the libraries' output goes to the run folder's log."""
    from evomerge.cli.process import quiet_output

    return quiet_output(run_dir)


def _run(search, run_dir: Path, *, more: int | None) -> None:
    """Run until the study's budget (config search.trials) is met, or `more` trials more."""
    from evomerge.search.study import best_trial, finished_count, run_summary

    config = search.config
    until = (
        finished_count(search.study.get_trials(deepcopy=False)) + more
        if more
        else config.search.trials
    )
    timeout = config.search.timeout_minutes
    try:
        with _output(run_dir) as terminal:
            search.run(until=until, timeout_s=timeout * 60 if timeout else None, progress=terminal)
    except KeyboardInterrupt as interrupt:
        click.echo(
            f"\nstopped; every finished trial is saved. Continue with: evomerge resume {run_dir}",
            err=True,
        )
        raise SystemExit(130) from interrupt
    trials = search.study.get_trials(deepcopy=False)
    summary, best = run_summary(trials), best_trial(search.study, trials)
    line = (
        f"{summary['complete']} complete, {summary['failed']} failed, "
        f"{summary['full_evaluations']} full evaluations"
    )
    if best is not None:
        line += f"; best trial #{best.number}: fitness {best.user_attrs['fitness']:.4f}"
    click.echo(line)


def _memory_options(command):
    """`--memory` and `--no-memory-check`: the memory plan each process checks before it loads
    anything (search, resume, worker: each on its own device)."""
    command = click.option(
        "--no-memory-check",
        is_flag=True,
        help="Start even if the memory plan (`evomerge plan`) says the search does not fit.",
    )(command)
    return click.option(
        "--memory",
        help="Memory the device has for the search, e.g. 80GB (default: what it has free now); "
        "see `evomerge plan`.",
    )(command)


@click.command("search")
@click.argument("config_path", metavar="CONFIG.yaml", type=click.Path(path_type=Path))
@click.option(
    "--run-dir", type=click.Path(path_type=Path), help="Run folder (default: runs/<config name>)."
)
@click.option(
    "--trials",
    type=click.IntRange(min=0),
    help="Trials to run (default: the config's search.trials). 0: only create the run folder and "
    "the study (baselines queued), for `evomerge worker` processes to run.",
)
@_threads
@_memory_options
def search(
    config_path: Path,
    run_dir: Path | None,
    trials: int | None,
    threads: int | None,
    memory: str | None,
    no_memory_check: bool,
) -> None:
    """Start a search over merge recipes described by CONFIG.yaml."""
    from evomerge.errors import UserError
    from evomerge.search.config import load_run_config
    from evomerge.search.run_folder import write_run_folder

    config = load_run_config(config_path)
    run_dir = run_dir or Path("runs") / config_path.stem
    if (run_dir / "run.json").exists():
        raise UserError(
            f"{str(run_dir)!r} already holds a run; continue it with: evomerge resume {run_dir}"
        )
    if trials:
        config = config.model_copy(
            update={"search": config.search.model_copy(update={"trials": trials})}
        )
    _set_up(config, run_dir, threads)
    if not no_memory_check and trials != 0:  # workers (trials 0) plan on their own devices
        _check_memory(config, memory)
    # a failed set-up (missing model, unknown task, ...) leaves no run
    with _removed_on_failure(run_dir), _output(run_dir):
        write_run_folder(config, run_dir)
        if trials == 0:
            from evomerge.fitness.tasks import build_task_set
            from evomerge.search.fidelity import Schedule
            from evomerge.search.run_folder import build_space
            from evomerge.search.study import create_study, open_run_storage

            # the checks a worker would make at its start (tasks, metrics, the fidelity schedule),
            # made now: no study for workers that could never run a trial
            Schedule.of(config, build_task_set(config.fitness, run_dir))
            create_study(config, open_run_storage(config, run_dir), build_space(config))
            click.echo(
                f"study ready ({config.search.trials} trials); "
                f"start workers with: evomerge worker {run_dir}"
            )
            return
        from evomerge.search.loop import Search

        search = Search(config, run_dir, create=True)
    _run(search, run_dir, more=None)


def _check_memory(config, memory: str | None) -> None:
    """Refuse, before anything loads or is written, a search whose memory plan does not fit
    its device (evomerge/search/memory_plan.py)."""
    from evomerge.errors import UserError
    from evomerge.io.output import parse_size
    from evomerge.search.memory_plan import plan_memory

    plan = plan_memory(config, memory=parse_size(memory) if memory is not None else None)
    if not plan.fits:
        raise UserError(plan.refusal())


@contextmanager
def _removed_on_failure(run_dir: Path) -> Iterator[None]:
    """Undo a failed set-up: remove what the block added to `run_dir` (all of it if it was new)."""
    import shutil

    existed = set(run_dir.iterdir()) if run_dir.is_dir() else None
    new_parents = [p for p in run_dir.parents if not p.exists()]  # innermost first
    try:
        yield
    except BaseException:
        if existed is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            for entry in set(run_dir.iterdir()) - existed:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(
                    missing_ok=True
                )
        for parent in new_parents:
            try:
                parent.rmdir()
            except OSError:
                break
        raise


@click.command("resume")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--trials",
    type=click.IntRange(min=0),
    help="Run this many more trials (default: until the budget is met).",
)
@_threads
@_memory_options
def resume(
    run_dir: Path,
    trials: int | None,
    threads: int | None,
    memory: str | None,
    no_memory_check: bool,
) -> None:
    """Continue the study of RUN_DIR: same storage, same sampler state."""
    from evomerge.search.run_folder import read_run_folder

    config = read_run_folder(run_dir)
    _set_up(config, run_dir, threads)
    if not no_memory_check:
        _check_memory(config, memory)
    from evomerge.search.loop import Search

    with _output(run_dir):
        search = Search(config, run_dir, create=False)
    _run(search, run_dir, more=trials)


@click.command("worker")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--storage", help="Storage URL of the study (default: the run folder's).")
@click.option("--study", "study_name", help="Study name (default: the run's).")
@click.option("--device", help="Device of this worker, e.g. cuda:1 (default: the run's).")
@click.option(
    "--trials",
    type=click.IntRange(min=0),
    help="Run this many trials (default: until the study's budget is met).",
)
@_threads
@_memory_options
def worker(
    run_dir: Path,
    storage: str | None,
    study_name: str | None,
    device: str | None,
    trials: int | None,
    threads: int | None,
    memory: str | None,
    no_memory_check: bool,
) -> None:
    """Join the study of RUN_DIR as one more worker (one per GPU or node)."""
    from evomerge.search.run_folder import read_run_folder

    config = read_run_folder(run_dir)
    search_cfg = config.search.model_copy(
        update={k: v for k, v in {"storage": storage, "study_name": study_name}.items() if v}
    )
    config = config.model_copy(update={"search": search_cfg, "device": device or config.device})
    _set_up(config, run_dir, threads)
    if not no_memory_check:  # on this worker's own device
        _check_memory(config, memory)
    from evomerge.search.loop import Search

    with _output(run_dir):
        search = Search(config, run_dir, create=False)
    _run(search, run_dir, more=trials)


commands = (search, resume, worker)
