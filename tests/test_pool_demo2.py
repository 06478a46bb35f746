"""The demo2 pool: it builds, its tasks load in lm-eval with both splits and score, and its
generate-until task scores real generations by exact match."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from evomerge import pool

SKILLS = pool.POOLS["demo2"]
GENERATED = [s for s in SKILLS.values() if s.output_type == "generate_until"]


def _evaluator(manifest: dict, models: dict, run_dir: Path):
    from evomerge.fitness import Evaluator, FitnessConfig

    config = FitnessConfig(
        tasks=[{"name": s["task"], "metric": s["metric"]} for s in manifest["skills"].values()],
        task_paths=[manifest["task_path"]],
    )
    # One live model; each model's weights are copied in, as the search does.
    return Evaluator(copy.deepcopy(models["base"]), models["tokenizer"], config, run_dir)


def _copy_weights(dst, src) -> None:
    import torch

    with torch.no_grad():
        for p, q in zip(dst.parameters(), src.parameters(), strict=True):
            p.copy_(q)


def test_layout_manifest_and_metrics(small_pool2: Path) -> None:
    manifest = json.loads((small_pool2 / pool.MANIFEST_NAME).read_text())
    assert manifest["name"] == "demo2" and manifest["size"] == "small"
    assert set(manifest["models"]) == {"base", "shift", "sub", "dedup"}
    assert {s: v["metric"] for s, v in manifest["skills"].items()} == {
        "shift": "exact_match",
        "sub": "acc",
        "dedup": "acc",
    }
    assert not set(SKILLS) & set(pool.POOLS["demo"])  # other skills than the demo's
    for rel in manifest["models"].values():
        assert (small_pool2 / rel / "model.safetensors").is_file()
    yaml_text = (small_pool2 / "tasks" / "evomerge_shift.yaml").read_text()
    assert "output_type: generate_until" in yaml_text and "metric: exact_match" in yaml_text
    assert "validation_split: dev" in yaml_text and "test_split: test" in yaml_text


def test_tasks_load_with_both_splits_and_score(
    small_pool2: Path, small_pool2_models: dict, tmp_path: Path
) -> None:
    manifest = pool.load_manifest(small_pool2)
    evaluator = _evaluator(manifest, small_pool2_models, tmp_path / "run")
    for name, task in evaluator.tasks.leaf_tasks.items():
        assert {k: len(v) for k, v in task.dataset.items()} == {
            "dev": pool.N_DEV,
            "test": pool.N_TEST,
        }, name
        dev, test = ({d["prompt"] for d in task.dataset[k]} for k in ("dev", "test"))
        assert not dev & test, name
    scores = {}
    for name in ("base", *SKILLS):
        _copy_weights(evaluator.model, small_pool2_models[name])
        scores[name] = evaluator.score(full=True).per_task
    for skill in SKILLS.values():
        task = pool.TASK_PREFIX + skill.name
        assert all(0.0 <= scores[m][task] <= 1.0 for m in scores), scores
        # Specialists are real: each beats the base on its own skill (the small pool is a
        # smoke-sized version: only the full pool has margins worth merging).
        assert scores[skill.name][task] > scores["base"][task], (skill.name, scores)


def _greedy_match(model, tokenizer, docs: list[dict]) -> list[bool]:
    """Whether the model's greedy next token is right at every position of "answer." given the
    true prefix: for a model that must stop on ".", the same as its greedy generation being
    exactly the answer."""
    import torch

    hits = []
    for doc in docs:
        prompt = tokenizer(doc["prompt"])["input_ids"]
        full = tokenizer(doc["prompt"] + doc["answer"] + ".")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([full])).logits[0]
        predicted = logits[len(prompt) - 1 : len(full) - 1].argmax(-1).tolist()
        hits.append(predicted == full[len(prompt) :])
    return hits


def test_generate_until_task_scores_exact_match_of_real_generations(
    small_pool2: Path, small_pool2_models: dict, tmp_path: Path
) -> None:
    manifest = pool.load_manifest(small_pool2)
    evaluator = _evaluator(manifest, small_pool2_models, tmp_path / "run")
    for skill in GENERATED:
        _copy_weights(evaluator.model, small_pool2_models[skill.name])
        task = pool.TASK_PREFIX + skill.name
        result = evaluator.score(full=True)
        assert "exact_match,none" in result.metrics[task]
        docs = list(evaluator.tasks.leaf_tasks[task].eval_docs)
        expected = _greedy_match(evaluator.model, small_pool2_models["tokenizer"], docs)
        assert 0 < sum(expected) < len(expected)  # neither all right nor all wrong
        assert result.per_task[task] == sum(expected) / len(expected)
