"""Process-wide settings, made in one place: here, when a command starts.

Library modules never change the process (threads, warnings, log levels, environment); the
commands call `set_up_process`, and so must a script or test that uses the library the way a
command does (e.g. building an `Evaluator`: lm-eval and `datasets` read the Hugging Face
variables when they are first imported).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import TextIO

THREADS_DEFAULT = "$OMP_NUM_THREADS if set, else 1"
"""The default of every command's `--threads` (the rule is `resolve_threads`)."""


def threads_help(config_key: bool = False) -> str:
    """The `--threads` help of every command: the one rule, with the run config's `threads` in
    it where the command has a run config (search, resume, worker)."""
    config = "the config's `threads`, else " if config_key else ""
    return (
        f"CPU threads for torch and the merge kernel (default: {config}{THREADS_DEFAULT}). "
        "One by default: more threads than free cores run many times slower on a shared "
        "machine; give more on an idle one."
    )


def resolve_threads(threads: int | None, config_threads: int | None = None) -> int:
    """The one rule for CPU threads, in every command: `--threads` if given, else the run
    config's `threads` (where the command has a run config), else OMP_NUM_THREADS if the user set
    it to a whole number, else 1."""
    for given in (threads, config_threads):
        if given:
            return int(given)
    try:
        from_env = int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0])
    except ValueError:
        return 1
    return max(from_env, 1)


def set_threads(threads: int | None = None, config_threads: int | None = None) -> int:
    """Apply `resolve_threads`: OpenMP's and torch's intra-op thread counts (the merge kernel
    follows torch's). Torch is not imported for it: one loaded later reads OMP_NUM_THREADS, set
    here (a `report` that reads a study loads no torch)."""
    count = resolve_threads(threads, config_threads)
    os.environ["OMP_NUM_THREADS"] = str(count)  # the user's own where the rule took it
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(count)
    return count


def set_up_process(
    *,
    threads: int | None = None,
    config_threads: int | None = None,
    hf_home: Path | None = None,
    offline: bool = False,
) -> None:
    """Set what the commands need process-wide.

    - CPU threads by the one rule (`set_threads`: `threads`, else `config_threads`, else
      OMP_NUM_THREADS, else 1), before torch starts OpenMP where it is not loaded yet;
    - Hugging Face caches in `hf_home` (a run folder's `hf/`) unless the user set their own
      (their data may live there), and with `offline` no network access at all;
    - Optuna: warnings only (no line per trial), no ExperimentalWarning for the features the
      search uses on purpose.
    """
    set_threads(threads, config_threads)
    if hf_home is not None:
        os.environ.setdefault("HF_HOME", str(hf_home))
        os.environ.setdefault("HF_DATASETS_CACHE", str(Path(hf_home) / "datasets"))
    if offline:
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ[name] = "1"
    _quiet_optuna()


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


LOG_FILE = "search.log"
"""The run folder's log: what lm-eval, transformers and the rest print during a search."""


@contextmanager
def quiet_output(run_dir: Path, *, verbose: int | None = None) -> Iterator[TextIO]:
    """Quiet by default: inside the block, everything the libraries print to stderr (lm-eval's
    and transformers' progress bars, warnings, log records) and every log record that is not
    evomerge's own go to RUN_DIR/search.log. Yields the terminal's stream, for the search's own
    progress bar. With `verbose`, nothing is moved and the log file is not written."""
    terminal = sys.stderr
    if verbose is None:
        verbose = _cli_verbosity()
    if verbose:
        yield terminal
        return
    import optuna
    import transformers

    root = logging.getLogger()
    ours = logging.Filter("evomerge")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / LOG_FILE, "a", buffering=1) as log:
        to_log = logging.StreamHandler(log)
        to_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        on_terminal = list(root.handlers)
        for handler in on_terminal:
            handler.addFilter(ours)
        root.addHandler(to_log)
        # optuna and transformers log through their own handlers, bound to the stderr of their
        # first log call: route them through the root logger's handlers instead
        libraries = (optuna.logging, transformers.utils.logging)
        for library in libraries:
            library.disable_default_handler()
            library.enable_propagation()
        try:
            with redirect_stderr(log):  # tqdm bars and warnings write to sys.stderr
                yield terminal
        finally:
            root.removeHandler(to_log)
            for handler in on_terminal:
                handler.removeFilter(ours)
            for library in libraries:
                library.disable_propagation()
                library.enable_default_handler()


def _cli_verbosity() -> int:
    """How many `-v` the running `evomerge` command was given (0 outside the CLI)."""
    import click

    context = click.get_current_context(silent=True)
    return context.find_root().params.get("verbose", 0) if context else 0
