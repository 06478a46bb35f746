"""The demo pool: layout, loadability, determinism, held-out data, and real specialists
(demo2's own tests are in test_pool_demo2.py; the splits of both pools are checked here)."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge import pool
from evomerge.errors import UserError
from evomerge.pool.tasks import held_out, held_out_prompts

REPO = Path(__file__).resolve().parents[1]
SKILLS = pool.POOLS["demo"]


def test_layout_and_manifest(small_pool: Path) -> None:
    manifest = json.loads((small_pool / pool.MANIFEST_NAME).read_text())
    assert manifest["size"] == "small" and manifest["name"] == "demo"
    assert set(manifest["models"]) == {"base", *SKILLS}
    assert {s["metric"] for s in manifest["skills"].values()} == {"acc"}
    for rel in manifest["models"].values():
        folder = small_pool / rel
        assert (folder / "config.json").is_file()
        assert (folder / "model.safetensors").is_file()
        assert (folder / "tokenizer.json").is_file()
        assert not list(folder.glob("*.bin"))
    assert manifest["tasks"] == [pool.TASK_PREFIX + s for s in SKILLS]
    assert not list(small_pool.parent.glob(".*building"))  # staged build was renamed away


def test_models_load_with_head_dim_64(small_pool_models: dict) -> None:
    for name in ("base", *SKILLS):
        config = small_pool_models[name].config
        assert config.head_dim >= 64  # vLLM's CPU attention needs it
        assert config.model_type == "llama"


def test_tokenizer_is_char_level_with_bos(small_pool_models: dict) -> None:
    tok = small_pool_models["tokenizer"]
    ids = tok("r:abc=cba.")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert len(ids) == 1 + len("r:abc=cba.")
    assert tok.decode(ids, skip_special_tokens=True) == "r:abc=cba."


@pytest.mark.parametrize("name", list(pool.POOLS))
def test_dev_and_test_are_disjoint_from_each_other_and_from_training(name: str) -> None:
    from evomerge.pool.training import Batches

    skills = pool.POOLS[name]
    splits = {s: held_out(skill) for s, skill in skills.items()}
    for s, docs in splits.items():
        dev, test = ({d["prompt"] for d in docs[k]} for k in ("dev", "test"))
        assert len(dev) == pool.N_DEV and len(test) == pool.N_TEST, s  # distinct prompts
        assert not dev & test, s
    excluded = held_out_prompts(skills)
    assert len(excluded) == len(skills) * (pool.N_DEV + pool.N_TEST)
    # The base's stream and a specialist's (with replay of the mix) never draw a held-out prompt.
    everything = Batches(list(skills.values()), pool.make_tokenizer(), held_out=excluded, seed=1)
    first = next(iter(skills))
    specialist = pool.specialist_batches(
        skills,
        [first],
        pool.make_tokenizer(),
        dataclasses.replace(pool.SIZES["full"], replay=0.5),
        seed=10,
    )
    drawn = {stream.example()[0] for stream in (everything, specialist) for _ in range(4000)}
    assert not drawn & excluded
    # ... while the held-out prompts are ordinary draws of the skills (the check is not vacuous;
    # demo2's shift has too many prompts for 3000 draws to meet one, its sub and dedup do).
    assert any(
        p in excluded
        for skill in skills.values()
        for p in (skill.generate(random.Random(i))[0] for i in range(3000))
    )


def test_shipped_eval_tasks_match_the_generator(tmp_path: Path) -> None:
    """eval_tasks/ in the repo is exactly what `write_tasks` writes for the demo pool."""
    names = pool.write_tasks(tmp_path, "demo", SKILLS)
    shipped = REPO / "eval_tasks"
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(str(p.relative_to(shipped)) for p in shipped.rglob("*") if p.is_file())
    for rel in written:
        assert (shipped / rel).read_text() == (tmp_path / rel).read_text(), rel
    assert names == [pool.TASK_PREFIX + s for s in SKILLS]


def test_build_is_deterministic(small_pool: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    pool.build_pool(again, size="small")
    for name in ("base", *SKILLS):
        first = (small_pool / name / "model.safetensors").read_bytes()
        assert (again / name / "model.safetensors").read_bytes() == first, name


def test_specialists_beat_base_on_own_skill(
    small_pool: Path, small_pool_models: dict, tmp_path: Path
) -> None:
    import torch

    from evomerge.fitness import Evaluator, FitnessConfig

    manifest = pool.load_manifest(small_pool)
    config = FitnessConfig(tasks=manifest["tasks"], task_paths=[manifest["task_path"]])
    # One live model; each specialist's weights are copied in, as the search will do.
    live = copy.deepcopy(small_pool_models["base"])
    evaluator = Evaluator(live, small_pool_models["tokenizer"], config, tmp_path / "run")
    scores = {}
    for name in ("base", *SKILLS):
        with torch.no_grad():
            for p, src in zip(live.parameters(), small_pool_models[name].parameters()):
                p.copy_(src)
        scores[name] = evaluator.score(full=True).metrics
    for skill in SKILLS:
        own, base = (
            scores[skill][pool.TASK_PREFIX + skill],
            scores["base"][pool.TASK_PREFIX + skill],
        )
        # The small pool is a smoke-sized version: clearly better, not the full pool's margins.
        assert own["acc,none"] >= base["acc,none"] + 0.05, (skill, scores)
        assert own["perplexity,none"] < base["perplexity,none"], (skill, scores)


def test_existing_folder_needs_force(small_pool: Path) -> None:
    with pytest.raises(UserError, match="--force"):
        pool.build_pool(small_pool, size="small")
    with pytest.raises(UserError, match="unknown pool size"):
        pool.build_pool(small_pool / "x", size="huge")
    with pytest.raises(UserError, match="unknown pool 'demo9'; choose one of demo, demo2, demo3"):
        pool.build_pool(small_pool / "x", name="demo9")
    assert not (small_pool / "x").exists()


@pytest.mark.parametrize("name, fixture", [("demo", "small_pool"), ("demo2", "small_pool2")])
def test_cli_user_error_is_one_line_exit_2(
    name: str, fixture: str, request: pytest.FixtureRequest
) -> None:
    built = request.getfixturevalue(fixture)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from evomerge.cli import main; main()",
            "pool",
            name,
            str(built),
            "--size",
            "small",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "--force" in proc.stderr
    assert "Traceback" not in proc.stderr
