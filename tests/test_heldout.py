"""Held-out scores end to end: a search on dev, then `report` and `export` score test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers.pool_fixtures import pool_search_config
from test_fitness import split_task_folder

from evomerge.pool import N_TEST

pytestmark = pytest.mark.slow

TASKS = ["evomerge_add", "evomerge_rev"]


@pytest.fixture(scope="module")
def split_run(small_pool: Path, tmp_path_factory) -> Path:
    """A 6-trial search over tasks with dev and test splits, every trial on all of dev."""
    from evomerge.cli.process import set_up_process
    from evomerge.search.config import load_run_config
    from evomerge.search.loop import Search
    from evomerge.search.run_folder import write_run_folder

    tmp = tmp_path_factory.mktemp("heldout")
    tasks = split_task_folder(small_pool, tmp / "tasks")
    config = pool_search_config(
        small_pool,
        tasks=TASKS,
        subset=8,
        space="linear_global",
        search={"sampler": "gp", "trials": 6, "seed": 0, "fidelity": None},
    )
    config["fitness"].pop("subset")
    config["fitness"]["task_paths"] = [str(tasks)]
    (tmp / "run.yaml").write_text(yaml.safe_dump(config))
    run_config = load_run_config(tmp / "run.yaml")
    run_dir = tmp / "run"
    set_up_process(threads=1, hf_home=run_dir / "hf", offline=True)
    write_run_folder(run_config, run_dir)
    Search(run_config, run_dir).run(until=6, progress=False)
    return run_dir


def test_report_scores_the_best_trial_on_test_and_the_study_never_sees_it(split_run: Path) -> None:
    from evomerge.results.report import report_run
    from evomerge.search.run_folder import read_run_folder
    from evomerge.search.study import best_trial, open_run_study

    report = report_run(split_run)
    held = report.summary["held_out"]
    best, rival = held["trials"]
    config = read_run_folder(split_run)
    study = open_run_study(config, split_run)
    chosen = best_trial(study)
    assert best["number"] == chosen.number and rival["baseline"] is not None
    assert rival["number"] != best["number"]
    # the search scored dev: its scores are the dev scores, and differ from test
    assert best["dev"]["per_task"] == pytest.approx(chosen.user_attrs["per_task"])
    assert best["test"]["per_task"] != best["dev"]["per_task"]
    assert best["test"]["n_examples"] == {
        t: N_TEST - 60 for t in TASKS
    }  # split_task_folder's test part
    assert all(0 <= se < 0.2 for se in best["test"]["se"].values()) and any(
        best["test"]["se"].values()
    )
    assert held["held_out"] == {t: True for t in TASKS}
    for split in ("dev", "test"):
        paired = held["paired"][split]
        assert paired["difference"] == pytest.approx(best[split]["value"] - rival[split]["value"])
        assert paired["se"] > 0 and 0 <= paired["p_not_better"] <= 1
    # no test score reached the study
    assert not any("test" in json.dumps(t.user_attrs) for t in study.trials)
    assert (
        "dev chose, test held out" in report.text
        and "paired" in report.text
        and " ± " in report.text
    )
    assert "no held-out split" not in report.text

    # the second report reads the cache
    cache = list((split_run / "heldout").glob("scores-*.json"))
    assert len(cache) == 1
    stamp = cache[0].stat().st_mtime_ns
    assert report_run(split_run).summary["held_out"] == held
    assert cache[0].stat().st_mtime_ns == stamp


def test_export_prints_and_cards_dev_and_test(split_run: Path, tmp_path: Path) -> None:
    from evomerge.results.export import export_trial

    said = []
    export_trial(split_run, tmp_path / "out", say=said.append)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| task | dev | test |" in card and "combined fitness" in card and " ± " in card
    assert "dev chose, test held out" in said[0]


def test_a_report_without_the_pool_says_so(split_run: Path, tmp_path: Path) -> None:
    from evomerge.results.heldout import chosen_scores
    from evomerge.results.report import format_held_out
    from evomerge.search.run_folder import read_run_folder
    from evomerge.search.study import best_trial, open_run_study

    config = read_run_folder(split_run)
    study = open_run_study(config, split_run)
    gone = config.model_copy(
        update={"pool": config.pool.model_copy(update={"base": str(tmp_path / "gone")})}
    )
    other = tmp_path / "run"
    other.mkdir()
    scores = chosen_scores(gone, other, study, best_trial(study))
    assert "not on disk" in format_held_out(scores)
