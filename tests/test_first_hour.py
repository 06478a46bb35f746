"""Issue 31, a real user's first hour: `evomerge eval BASE+ADAPTER`, the all-zero warning (eval,
search start, report) and lm-eval's warnings about the already-loaded model kept off the
terminal."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from evomerge.fitness.zeros import all_zero_tasks, zero_warning

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def evomerge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evomerge", *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_eval_takes_base_plus_adapter_on_either_split(small_lora_pool: Path, tmp_path: Path):
    pool = small_lora_pool
    out = tmp_path / "scores.json"
    result = evomerge(
        "eval",
        f"{pool}/base+{pool}/add",
        "--task-path",
        str(pool / "tasks"),
        "--tasks",
        "evomerge_add",
        "--split",
        "test",
        "--limit",
        "20",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "evomerge_add" in result.stdout
    # lm-eval's two warnings about the already-initialised model are not the user's business
    assert "already-initialized" not in result.stderr
    assert "is not of type `str`" not in result.stderr


def test_the_live_model_of_base_plus_adapter_is_the_adapter_merged(small_lora_pool: Path):
    import torch

    from evomerge.fitness.live_model import load_live_model
    from evomerge.io.adapters import open_checkpoint

    reference = f"{small_lora_pool}/base+{small_lora_pool}/rev"
    model, _ = load_live_model(reference)
    checkpoint = open_checkpoint(reference)
    state = model.state_dict()
    assert checkpoint.factors  # the adapter changes something ...
    for name in checkpoint.names:  # ... and every tensor is base + adapter, as merge reads it
        assert torch.equal(state[name], checkpoint.tensor(name)), name


def test_eval_warns_when_the_model_scores_exactly_zero(small_pool: Path, tmp_path: Path):
    # a target no model can write ('#' is no token of the char-level vocabulary: <unk>)
    tasks = tmp_path / "tasks"
    (tasks / "data").mkdir(parents=True)
    for f in (small_pool / "tasks" / "data").glob("add_*.jsonl"):
        (tasks / "data" / f.name).write_bytes(f.read_bytes())
    text = (small_pool / "tasks" / "evomerge_add.yaml").read_text()
    text = text.replace("task: evomerge_add", "task: evomerge_add_hash")
    (tasks / "evomerge_add_hash.yaml").write_text(text.replace("{{answer}}.", "#{{answer}}."))
    result = evomerge(
        "eval",
        str(small_pool / "add"),
        "--task-path",
        str(tasks),
        "--tasks",
        "evomerge_add_hash",
        "--limit",
        "10",
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "exactly 0" in line]
    assert len(lines) == 1, result.stderr
    assert "evomerge_add_hash" in lines[0] and "chat template" in lines[0]
    assert "delimiter" in lines[0] and "target format" in lines[0]


def test_all_zero_tasks_needs_every_model_at_zero():
    maximize = {"a": True, "b": True, "ppl": False}
    rows = [{"a": 0.0, "b": 0.0, "ppl": 0.0}, {"a": 0.0, "b": 0.1, "ppl": 0.0}]
    assert all_zero_tasks(rows, maximize) == ["a"]  # never a minimised metric
    assert all_zero_tasks([], maximize) == []
    assert zero_warning(["a"]).startswith("a: every model scored exactly 0;")


def test_a_search_says_so_once_its_baselines_all_score_zero(caplog):
    import optuna

    from evomerge.search.loop import Search

    study = optuna.create_study(direction="maximize")
    for label, scores in (("base", {"t": 0.0, "u": 0.5}), ("uniform", {"t": 0.0, "u": 0.0})):
        study.enqueue_trial({"x": 0.5}, user_attrs={"baseline": label})
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        trial.set_user_attr("per_task", scores)
        study.tell(trial, 0.0)
    search = SimpleNamespace(
        study=study,
        evaluator=SimpleNamespace(tasks=SimpleNamespace(maximize={"t": True, "u": True})),
        _zeros_checked=False,
    )
    with caplog.at_level(logging.WARNING, logger="evomerge.search.loop"):
        Search._warn_if_baselines_zero(search)
        Search._warn_if_baselines_zero(search)  # once, not per trial
    warned = [r.getMessage() for r in caplog.records if "exactly 0" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("t: every baseline")


def test_no_search_warning_before_the_baselines_are_scored(caplog):
    import optuna

    from evomerge.search.loop import Search

    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"x": 0.5}, user_attrs={"baseline": "base"})
    search = SimpleNamespace(
        study=study,
        evaluator=SimpleNamespace(tasks=SimpleNamespace(maximize={"t": True})),
        _zeros_checked=False,
    )
    with caplog.at_level(logging.WARNING, logger="evomerge.search.loop"):
        Search._warn_if_baselines_zero(search)
    assert not search._zeros_checked
    assert not [r for r in caplog.records if "exactly 0" in r.getMessage()]


def test_the_report_says_when_every_trial_scored_zero_on_a_task(tmp_path: Path):
    import optuna
    from optuna.distributions import FloatDistribution
    from test_report import make_space

    from evomerge.results.report import make_report
    from evomerge.search.run_folder import RunGenes

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = make_space()
    study = optuna.create_study(direction="maximize")
    for label, genome in list(space.baselines().items())[:3]:
        per_task = {"evomerge_add": 0.0, "evomerge_rev": 0.2}  # add: 0 everywhere, rev not
        study.add_trial(
            optuna.trial.create_trial(
                params=genome,
                distributions={g.name: FloatDistribution(g.low, g.high) for g in space.genes},
                value=0.1,
                user_attrs={
                    "baseline": label,
                    "fidelity": "full",
                    "fitness": 0.1,
                    "per_task": per_task,
                    "examples": 10,
                },
            )
        )
    report = make_report(study, RunGenes.of(space), tmp_path / "out")
    warned = [line for line in report.text.splitlines() if "exactly 0" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: evomerge_add: every trial")
    assert report.summary["all_zero_tasks"] == ["evomerge_add"]
