"""The demo pool: layout, loadability, determinism, held-out data, and real specialists."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge import pool
from evomerge.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_layout_and_manifest(small_pool: Path) -> None:
    manifest = json.loads((small_pool / pool.MANIFEST_NAME).read_text())
    assert manifest["size"] == "small"
    assert set(manifest["models"]) == {"base", *pool.SKILLS}
    for rel in manifest["models"].values():
        folder = small_pool / rel
        assert (folder / "config.json").is_file()
        assert (folder / "model.safetensors").is_file()
        assert (folder / "tokenizer.json").is_file()
        assert not list(folder.glob("*.bin"))
    assert manifest["tasks"] == [pool.TASK_PREFIX + s for s in pool.SKILLS]
    assert not list(small_pool.parent.glob(".*building"))  # staged build was renamed away


def test_models_load_with_head_dim_64(small_pool_models: dict) -> None:
    for name in ("base", *pool.SKILLS):
        config = small_pool_models[name].config
        assert config.head_dim >= 64  # vLLM's CPU attention needs it
        assert config.model_type == "llama"


def test_tokenizer_is_char_level_with_bos(small_pool_models: dict) -> None:
    tok = small_pool_models["tokenizer"]
    ids = tok("r:abc=cba.")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert len(ids) == 1 + len("r:abc=cba.")
    assert tok.decode(ids, skip_special_tokens=True) == "r:abc=cba."


def test_test_sets_are_disjoint_from_training() -> None:
    tok = pool.make_tokenizer()
    batches = pool._Batches(list(pool.SKILLS), tok, seed=1)
    held_out = {d["prompt"] for s in pool.SKILLS for d in pool.test_set(s)}
    assert len(held_out) == len(pool.SKILLS) * pool.N_TEST  # distinct prompts
    drawn = {batches._example()[0] for _ in range(5000)}
    assert not drawn & held_out


def test_shipped_eval_tasks_match_the_generator(tmp_path: Path) -> None:
    """eval_tasks/ in the repo is exactly what `pool.write_tasks` writes."""
    names = pool.write_tasks(tmp_path)
    shipped = REPO / "eval_tasks"
    for f in sorted(p for p in tmp_path.rglob("*") if p.is_file()):
        rel = f.relative_to(tmp_path)
        assert (shipped / rel).read_text() == f.read_text(), rel
    assert names == [pool.TASK_PREFIX + s for s in pool.SKILLS]


def test_build_is_deterministic(small_pool: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    pool.build_pool(again, size="small")
    for name in ("base", *pool.SKILLS):
        first = (small_pool / name / "model.safetensors").read_bytes()
        assert (again / name / "model.safetensors").read_bytes() == first, name


def test_specialists_beat_base_on_own_skill(small_pool: Path, small_pool_models: dict,
                                             tmp_path: Path) -> None:
    import torch

    from evomerge.fitness import Evaluator, FitnessConfig

    manifest = pool.load_manifest(small_pool)
    config = FitnessConfig(tasks=manifest["tasks"], task_paths=[manifest["task_path"]])
    # One live model; each specialist's weights are copied in, as the search will do.
    live = copy.deepcopy(small_pool_models["base"])
    evaluator = Evaluator(live, small_pool_models["tokenizer"], config, tmp_path / "run")
    scores = {}
    for name in ("base", *pool.SKILLS):
        with torch.no_grad():
            for p, src in zip(live.parameters(), small_pool_models[name].parameters()):
                p.copy_(src)
        scores[name] = evaluator.score(full=True).metrics
    for skill in pool.SKILLS:
        own, base = scores[skill][pool.TASK_PREFIX + skill], scores["base"][pool.TASK_PREFIX + skill]
        # The small pool is a smoke-sized version: clearly better, not the full pool's margins.
        assert own["acc,none"] >= base["acc,none"] + 0.05, (skill, scores)
        assert own["perplexity,none"] < base["perplexity,none"], (skill, scores)


def test_existing_folder_needs_force(small_pool: Path) -> None:
    with pytest.raises(UserError, match="--force"):
        pool.build_pool(small_pool, size="small")
    with pytest.raises(UserError, match="unknown pool size"):
        pool.build_pool(small_pool / "x", size="huge")


def test_cli_user_error_is_one_line_exit_2(small_pool: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from evomerge.cli import main; main()",
         "pool", "demo", str(small_pool), "--size", "small"],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "--force" in proc.stderr
    assert "Traceback" not in proc.stderr
