"""Process environment for offline evaluation, set before datasets/lm-eval are imported."""

from __future__ import annotations

import os
from pathlib import Path


def prepare_environment(run_dir: Path, *, offline: bool) -> None:
    """Keep Hugging Face caches in the run folder and (by default) forbid network access.

    `datasets` reads these variables when it is first imported, so this runs before lm-eval is
    imported. Cache locations the user has already set are kept (their data may live there);
    local evomerge tasks also pass an explicit `cache_dir` (see `fitness.tasks`).
    """
    hf_home = Path(run_dir) / "hf"
    os.environ.setdefault("HF_HOME", str(hf_home))
    os.environ.setdefault("HF_DATASETS_CACHE", str(hf_home / "datasets"))
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
