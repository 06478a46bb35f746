"""Process-wide settings, made in one place: here, when a command starts.

Library modules never change the process (threads, warnings, log levels, environment); the
commands call `set_up_process`, and so must a script or test that uses the library the way a
command does (e.g. building an `Evaluator`: lm-eval and `datasets` read the Hugging Face
variables when they are first imported).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional


def set_up_process(
    *, threads: Optional[int] = None, hf_home: Optional[Path] = None, offline: bool = False
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
