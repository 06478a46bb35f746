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


def set_up_process(
    *, threads: int | None = None, hf_home: Path | None = None, offline: bool = False
) -> None:
    """Set what the commands need process-wide.

    - OpenMP threads: one unless the user set OMP_NUM_THREADS (before torch starts OpenMP);
      torch's intra-op threads: `threads` if given;
    - Hugging Face caches in `hf_home` (a run folder's `hf/`) unless the user set their own
      (their data may live there), and with `offline` no network access at all;
    - Optuna: warnings only (no line per trial), no ExperimentalWarning for the features the
      search uses on purpose.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if hf_home is not None:
        os.environ.setdefault("HF_HOME", str(hf_home))
        os.environ.setdefault("HF_DATASETS_CACHE", str(Path(hf_home) / "datasets"))
    if offline:
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ[name] = "1"
    if threads:
        import torch

        torch.set_num_threads(threads)
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
