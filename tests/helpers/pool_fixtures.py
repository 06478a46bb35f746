"""Session fixtures over the small demo and demo2 pools (each built once per test session,
~10 s, only by the tests that ask for it).

Wire into tests with `pytest_plugins = ["helpers.pool_fixtures"]` in tests/conftest.py (or import
the fixtures there).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def small_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly built `small` demo pool: base/, add/, rev/, sort/, tasks/, pool.json."""
    import torch

    from evomerge.pool import build_pool

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("pool") / "demo"
    build_pool(out, size="small")
    return out


@pytest.fixture(scope="session")
def small_pool2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly built `small` demo2 pool: base/, shift/, sub/, dedup/, tasks/, pool.json."""
    import torch

    from evomerge.pool import build_pool

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("pool2") / "demo2"
    build_pool(out, name="demo2", size="small")
    return out


@pytest.fixture(scope="session")
def small_lora_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly built `small` demo-lora pool: base/, add/, rev/, sort/ (LoRA adapters), tasks/."""
    import torch

    from evomerge.pool.lora import build_lora_pool

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("lora-pool") / "demo-lora"
    build_lora_pool(out, size="small")
    return out


def load_pool_models(pool: Path) -> dict:
    """name -> loaded model (eval mode) for every model of a pool folder, plus `tokenizer`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.pool import load_manifest

    manifest = load_manifest(pool)
    models = {
        name: AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
        for name, path in manifest["models"].items()
    }
    models["tokenizer"] = AutoTokenizer.from_pretrained(manifest["models"]["base"])
    return models


@pytest.fixture(scope="session")
def small_pool_models(small_pool: Path) -> dict:
    """Every model of the small demo pool, loaded, plus `tokenizer`."""
    return load_pool_models(small_pool)


@pytest.fixture(scope="session")
def small_pool2_models(small_pool2: Path) -> dict:
    """Every model of the small demo2 pool, loaded, plus `tokenizer`."""
    return load_pool_models(small_pool2)


SKILLS = ("add", "rev", "sort")


def pool_search_config(
    pool: Path, *, tasks, subset: int, search: dict, space="linear_global", **fitness
) -> dict:
    """A search config (as a mapping) over a demo pool folder: its three specialists, its
    tasks, 1 thread. Tests pass what they vary."""
    return {
        "pool": {
            "base": str(pool / "base"),
            "models": {name: str(pool / name) for name in SKILLS},
            "dtype": "float32",
        },
        "space": space,
        "fitness": {
            "task_paths": [str(pool / "tasks")],
            "tasks": list(tasks),
            "subset": {"count": subset},
            **fitness,
        },
        "search": search,
        "threads": 1,
    }
