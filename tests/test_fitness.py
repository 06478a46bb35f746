"""The evaluator on a live model: real lm-eval, real (tiny) models, no mocks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from evomerge.errors import UserError
from evomerge.fitness import Evaluator, FitnessConfig, SubsetConfig, TaskSpec
from evomerge.pool import N_DEV, N_TEST, load_manifest

REPO = Path(__file__).resolve().parents[1]
ADD, REV, SORT = "evomerge_add", "evomerge_rev", "evomerge_sort"


def _copy_weights(dst, src) -> None:
    import torch

    with torch.no_grad():
        for (name, p), (src_name, q) in zip(dst.named_parameters(), src.named_parameters()):
            assert name == src_name
            p.data.copy_(q.data)


@pytest.fixture(scope="module")
def live(small_pool_models: dict):
    """A private copy of the base model that tests may overwrite in place."""
    return copy.deepcopy(small_pool_models["base"])


@pytest.fixture(scope="module")
def evaluator(live, small_pool: Path, small_pool_models: dict, tmp_path_factory) -> Evaluator:
    config = FitnessConfig(
        tasks=[ADD, REV, {"name": SORT, "metric": "perplexity", "weight": 0.5}],
        task_paths=[load_manifest(small_pool)["task_path"]],
        subset=SubsetConfig(count=40),
    )
    run_dir = tmp_path_factory.mktemp("run")
    return Evaluator(live, small_pool_models["tokenizer"], config, run_dir)


def test_same_weights_score_identically_twice(evaluator: Evaluator) -> None:
    first, second = evaluator.score(), evaluator.score()
    assert first.value == second.value
    assert first.per_task == second.per_task


def test_swapping_weights_in_and_back_reproduces_the_score(
    evaluator: Evaluator, live, small_pool_models: dict
) -> None:
    import torch

    _copy_weights(live, small_pool_models["base"])
    before = evaluator.score()
    saved = {k: v.clone() for k, v in live.state_dict().items()}
    _copy_weights(live, small_pool_models["sort"])
    swapped = evaluator.score()
    assert swapped.per_task != before.per_task  # the live model really changed
    with torch.no_grad():
        for k, v in live.state_dict().items():
            v.copy_(saved[k])
    after = evaluator.score()
    assert after.per_task == before.per_task
    assert after.value == before.value


def test_lower_is_better_metric_counts_the_right_way(
    evaluator: Evaluator, live, small_pool_models: dict
) -> None:
    assert evaluator.tasks.maximize == {ADD: True, REV: True, SORT: False}
    _copy_weights(live, small_pool_models["base"])
    base = evaluator.score()
    _copy_weights(live, small_pool_models["sort"])
    spec = evaluator.score()
    _copy_weights(live, small_pool_models["base"])
    # The sort specialist has the lower perplexity on sort, and that raises its fitness share.
    assert spec.per_task[SORT] < base.per_task[SORT]
    for r in (base, spec):
        expected = (r.per_task[ADD] + r.per_task[REV] - 0.5 * r.per_task[SORT]) / 2.5
        assert r.value == pytest.approx(expected)


def test_explicit_direction_overrides_the_task(
    small_pool: Path, small_pool_models: dict, tmp_path: Path
) -> None:
    config = FitnessConfig(
        tasks=[{"name": ADD, "metric": "acc", "direction": "minimize"}],
        task_paths=[load_manifest(small_pool)["task_path"]],
        subset={"count": 5, "sampling": "first"},
    )
    ev = Evaluator(small_pool_models["base"], small_pool_models["tokenizer"], config, tmp_path)
    assert ev.tasks.maximize == {ADD: False}
    r = ev.score()
    assert r.value == -r.per_task[ADD]


def test_subset_and_full(evaluator: Evaluator, live, small_pool_models: dict) -> None:
    _copy_weights(live, small_pool_models["base"])
    sub, full = evaluator.score(), evaluator.score(full=True)
    assert not sub.full and full.full
    assert sub.n_examples == {ADD: 40, REV: 40, SORT: 40}
    assert full.n_examples == {ADD: N_DEV, REV: N_DEV, SORT: N_DEV}  # the search scores dev
    indices = evaluator.tasks.subset[ADD]
    assert len(set(indices)) == 40 and indices != list(range(40))  # seeded sample, not head
    assert evaluator.score().per_task == sub.per_task  # the subset is fixed


def test_subset_sizes() -> None:
    assert SubsetConfig(count=500).size_of(150) == 150
    assert SubsetConfig(fraction=0.2).size_of(150) == 30
    assert SubsetConfig(fraction=0.001).size_of(150) == 1
    with pytest.raises(ValidationError):
        SubsetConfig()
    with pytest.raises(ValidationError):
        SubsetConfig(count=3, fraction=0.5)


def test_config_rejects_mistakes() -> None:
    with pytest.raises(ValidationError, match="extra"):
        FitnessConfig(tasks=[ADD], sampler="cmaes")
    with pytest.raises(ValidationError, match="twice"):
        FitnessConfig(tasks=[ADD, ADD])
    with pytest.raises(ValidationError):
        FitnessConfig(tasks=[{"name": ADD, "weight": -1}])
    with pytest.raises(ValidationError):
        FitnessConfig(tasks=[ADD], backend="tgi")
    assert TaskSpec(name=ADD, metric="exact_match,strict-match").metric_key == (
        "exact_match,strict-match"
    )


def test_unknown_task_and_metric_are_user_errors(small_pool_models: dict, tmp_path: Path) -> None:
    base, tok = small_pool_models["base"], small_pool_models["tokenizer"]
    paths = [REPO / "eval_tasks"]
    with pytest.raises(UserError, match="did you mean evomerge_add"):
        Evaluator(base, tok, FitnessConfig(tasks=["evomerge_ad"], task_paths=paths), tmp_path)
    with pytest.raises(UserError, match="no metric 'f1'"):
        Evaluator(
            base,
            tok,
            FitnessConfig(tasks=[{"name": ADD, "metric": "f1"}], task_paths=paths),
            tmp_path,
        )


def test_task_data_paths_do_not_depend_on_cwd(
    small_pool_models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # far from eval_tasks/ and its data/
    config = FitnessConfig(tasks=[REV], task_paths=[REPO / "eval_tasks"], subset={"count": 8})
    ev = Evaluator(small_pool_models["base"], small_pool_models["tokenizer"], config, "run")
    assert ev.score().n_examples == {REV: 8}
    assert (tmp_path / "run" / "hf" / "datasets").is_dir()  # dataset cache stays in the run


def test_eval_command(small_pool: Path, tmp_path: Path) -> None:
    from evomerge.cli import cli

    out = tmp_path / "scores.json"
    result = CliRunner().invoke(
        cli,
        [
            "eval",
            str(small_pool / "sort"),
            "--task-path",
            str(small_pool / "tasks"),
            "--tasks",
            f"{SORT},{REV}:perplexity:0.5",
            "--limit",
            "10",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert SORT in result.output and "fitness" in result.output
    report = json.loads(out.read_text())
    assert report["n_examples"] == {SORT: 10, REV: 10}
    assert report["maximize"] == {SORT: True, REV: False}
    assert set(report["per_task"]) == {SORT, REV}


# --- dev and test splits ---------------------------------------------------------------------
def split_task_folder(pool: Path, dest: Path, n_dev: int = 60) -> Path:
    """The pool's tasks rewritten with a dev split (the first `n_dev` examples) and a test
    split (the rest), by the convention `evomerge pool` writes."""
    import yaml

    (dest / "data").mkdir(parents=True)
    for source in sorted((pool / "tasks").glob("*.yaml")):
        cfg = yaml.safe_load(source.read_text())
        skill = cfg["task"].removeprefix("evomerge_")
        lines = (pool / "tasks" / "data" / f"{skill}_test.jsonl").read_text().splitlines()
        for split, part in (("dev", lines[:n_dev]), ("test", lines[n_dev:])):
            (dest / "data" / f"{skill}_{split}.jsonl").write_text("\n".join(part) + "\n")
        cfg["dataset_kwargs"] = {
            "data_files": {s: f"data/{skill}_{s}.jsonl" for s in ("dev", "test")}
        }
        cfg["validation_split"], cfg["test_split"] = "dev", "test"
        (dest / source.name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


def test_the_search_scores_dev_and_the_report_test(
    small_pool: Path, small_pool_models: dict, tmp_path: Path
) -> None:
    tasks = split_task_folder(small_pool, tmp_path / "tasks")
    config = FitnessConfig(
        tasks=[ADD, {"name": REV, "metric": "perplexity"}], task_paths=[tasks], subset={"count": 10}
    )
    model, tok = small_pool_models["add"], small_pool_models["tokenizer"]
    dev = Evaluator(model, tok, config, tmp_path / "run")
    test = Evaluator(model, tok, config, tmp_path / "run", split="test")
    assert dev.tasks.held_out == test.tasks.held_out == {ADD: True, REV: True}
    assert dev.tasks.scored_split == {ADD: "dev", REV: "dev"}
    assert test.tasks.scored_split == {ADD: "test", REV: "test"}
    assert dev.score(full=True).n_examples == {ADD: 60, REV: 60}
    assert dev.score().n_examples == {ADD: 10, REV: 10}  # the subset is drawn from dev
    result = test.score(full=True, per_example=True)
    assert result.n_examples == {ADD: N_TEST - 60, REV: N_TEST - 60}
    # per-example values, in document order, aggregate back to the task's score
    assert len(result.per_example[ADD]) == N_TEST - 60 and set(result.per_example[ADD]) <= {
        0.0,
        1.0,
    }
    for task in (ADD, REV):
        assert test.aggregate(task, result.per_example[task]) == pytest.approx(
            result.per_task[task]
        )
    assert dev.score(full=True).per_task != result.per_task


def one_split_task_folder(pool: Path, dest: Path) -> Path:
    """The pool's tasks rewritten with their test split alone (a user's single-split task)."""
    import shutil

    import yaml

    shutil.copytree(pool / "tasks" / "data", dest / "data")
    for source in sorted((pool / "tasks").glob("*.yaml")):
        cfg = yaml.safe_load(source.read_text())
        cfg["dataset_kwargs"] = {
            "data_files": {"test": cfg["dataset_kwargs"]["data_files"]["test"]}
        }
        cfg.pop("validation_split", None)
        (dest / source.name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


def test_a_task_with_one_split_serves_both_roles(
    small_pool: Path, small_pool_models: dict, tmp_path: Path
) -> None:
    config = FitnessConfig(
        tasks=[ADD], task_paths=[one_split_task_folder(small_pool, tmp_path / "tasks")]
    )
    model, tok = small_pool_models["add"], small_pool_models["tokenizer"]
    dev = Evaluator(model, tok, config, tmp_path / "run")
    test = Evaluator(model, tok, config, tmp_path / "run", split="test")
    assert dev.tasks.held_out == {ADD: False}
    assert dev.score().per_task == test.score().per_task


def test_public_benchmarks_are_refused_unless_allowed() -> None:
    for name in ("mmlu_anatomy", "gsm8k", "arc_easy", "hellaswag", "truthfulqa_mc2", "winogrande"):
        with pytest.raises(ValidationError, match="public benchmark"):
            FitnessConfig(tasks=[name])
        assert FitnessConfig(tasks=[name], allow_public_benchmarks=True).tasks[0].name == name
    FitnessConfig(tasks=["evomerge_add", "my_arithmetic", "mathematics_mine"])  # not benchmarks


def test_a_public_benchmark_config_is_a_user_error(tmp_path: Path) -> None:
    import yaml

    from evomerge.cli import cli

    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "pool": {"base": "b", "models": {"a": "a"}},
                "space": "linear_global",
                "fitness": {"tasks": ["gsm8k"]},
            }
        )
    )
    result = CliRunner().invoke(cli, ["search", str(config), "--run-dir", str(tmp_path / "run")])
    assert isinstance(result.exception, UserError)  # one sentence, exit code 2 (cli.main)
    assert "public benchmark" in str(result.exception) and "allow_public_benchmarks" in str(
        result.exception
    )
    assert not (tmp_path / "run").exists()
