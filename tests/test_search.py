"""The search end to end on the small demo pool: real models, real lm-eval, real SQLite."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
import yaml
from helpers.pool_fixtures import pool_search_config

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def write_config(
    tmp: Path, pool: Path, *, space="linear_global", trials=6, batch_size=32, **search
) -> Path:
    config = pool_search_config(
        pool,
        space=space,
        tasks=["evomerge_add", "evomerge_rev", "evomerge_sort"],
        subset=8,
        batch_size=batch_size,
        search={"sampler": "cmaes", "trials": trials, "seed": 3, **search},
    )
    path = tmp / f"config-{len(list(tmp.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def evomerge(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "evomerge", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"evomerge {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result


def set_up_like_the_cli(config, run_dir: Path) -> None:
    """What `evomerge search` sets process-wide before it builds a `Search`."""
    from evomerge.cli.process import set_up_process

    set_up_process(threads=1, hf_home=run_dir / "hf", offline=config.fitness.offline)


def trials_of(run_dir: Path):
    import optuna

    study = optuna.load_study(study_name="evomerge", storage=f"sqlite:///{run_dir / 'study.db'}")
    return study.get_trials(deepcopy=False)


def wait_for_completed(run_dir: Path, count: int, timeout: float = 240) -> None:
    """Poll the study of a search running in another process until `count` trials completed.

    Read-only and without Optuna: opening the study through Optuna while the search creates it
    would race its schema creation (and write to the database from the test)."""
    deadline = time.time() + timeout
    database = run_dir / "study.db"
    while time.time() < deadline:
        if database.exists():
            try:
                with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
                    (done,) = db.execute(
                        "SELECT count(*) FROM trials WHERE state = 'COMPLETE'"
                    ).fetchone()
                if done >= count:
                    return
            except sqlite3.OperationalError:  # no trials table yet, or locked for a moment
                pass
        time.sleep(0.3)
    raise AssertionError(f"{count} trials did not complete within {timeout} s")


def test_resume_continues_the_same_cmaes_run(tmp_path, small_pool):
    """9 trials, stop, resume for 6 more in a new process: the CMA-ES generation that spans
    the restart is completed from both processes' trials, and the next one starts from it.
    (Optuna re-seeds the within-generation draws per process, so the proposals after the
    restart differ from an uninterrupted run's; the sampler state itself comes from storage.)"""
    straight = tmp_path / "straight"
    evomerge(
        "search", str(write_config(tmp_path, small_pool, trials=15)), "--run-dir", str(straight)
    )
    split = tmp_path / "split"
    evomerge("search", str(write_config(tmp_path, small_pool, trials=9)), "--run-dir", str(split))
    evomerge("resume", str(split), "--trials", "6")

    a, b = trials_of(straight), trials_of(split)
    assert [t.number for t in b] == list(range(15))
    # a seeded run repeats exactly: both runs' first 9 trials are the same
    assert [t.params for t in a[:9]] == [t.params for t in b[:9]]
    assert [t.value for t in a[:9]] == [t.value for t in b[:9]]
    # 3 genes -> population 7: trials 4-10 are generation 0 (across the restart), 11-14 generation 1
    generation = {t.number: t.system_attrs.get("cma:generation") for t in b}
    assert [generation[n] for n in range(4, 15)] == [0] * 7 + [1] * 4
    baselines = [t.user_attrs.get("baseline") for t in b if "baseline" in t.user_attrs]
    assert baselines == ["uniform", "only_add", "only_rev", "only_sort"]


def test_sigkill_mid_search_loses_at_most_the_trial_in_flight(tmp_path, small_pool):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, small_pool, trials=10_000, heartbeat_seconds=1, grace_seconds=2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "evomerge", "search", str(config), "--run-dir", str(run_dir)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_completed(run_dir, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {t.number: t.value for t in trials_of(run_dir) if t.state.name == "COMPLETE"}
    assert len(before) >= 3
    time.sleep(3)  # past the grace period: the killed worker's trial is stale
    evomerge("resume", str(run_dir), "--trials", "2")
    after = trials_of(run_dir)
    assert all(t.state.name != "RUNNING" for t in after)
    completed = {t.number: t.value for t in after if t.state.name == "COMPLETE"}
    assert {n: completed[n] for n in before} == before  # nothing finished was lost
    assert len(completed) >= len(before) + 2 - 1  # the stale trial may be retried as one of them


def test_export_equals_the_scored_candidate_bit_for_bit(tmp_path, small_pool):
    import torch
    from safetensors.torch import load_file

    from evomerge.merging.executor import run_merge
    from evomerge.merging.recipe import load_recipe
    from evomerge.results.export import export_trial
    from evomerge.search.config import load_run_config
    from evomerge.search.loop import Search
    from evomerge.search.run_folder import write_run_folder

    run_dir = tmp_path / "run"
    config = load_run_config(
        write_config(tmp_path, small_pool, space="dare_ties_layers", trials=12)
    )
    set_up_like_the_cli(config, run_dir)
    write_run_folder(config, run_dir)
    search = Search(config, run_dir)
    assert len(search.space.baselines()) < 12  # the last trial is a proposal, not a baseline
    search.run(until=12, progress=False)
    trial = search.study.trials[-1]  # a CMA-ES proposal: densities < 1, so DARE masks are in play
    assert trial.state.name == "COMPLETE"
    search.candidate.apply(trial.params)
    scored = {name: t.detach().clone() for name, t in search.candidate.targets.items()}

    export_trial(run_dir, tmp_path / "export", trial_number=trial.number)
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert exported.keys() == scored.keys()
    assert all(torch.equal(exported[k], scored[k]) for k in scored)
    assert "evomerge_add" in (tmp_path / "export" / "README.md").read_text()

    # the exported recipe is an ordinary recipe: `evomerge merge` rebuilds the same model
    run_merge(
        load_recipe(tmp_path / "export" / "recipe.yaml"),
        tmp_path / "again",
        seed=config.search.merge_seed,
    )
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(torch.equal(again[k], exported[k]) for k in exported)


def test_a_worker_whose_trial_another_worker_failed_goes_on(tmp_path, small_pool, caplog):
    """A worker paused past the grace period finds its trial failed by a peer when it records
    or tells its result (Optuna: "Cannot tell a FAIL trial"): it drops that result and goes on."""
    from optuna.trial import TrialState

    from evomerge.search.config import load_run_config
    from evomerge.search.loop import Search
    from evomerge.search.run_folder import write_run_folder

    run_dir = tmp_path / "run"
    config = load_run_config(
        write_config(tmp_path, small_pool, trials=3, baselines=False, sampler="random")
    )
    set_up_like_the_cli(config, run_dir)
    write_run_folder(config, run_dir)
    search = Search(config, run_dir)
    score = search.evaluator.score_examples

    def judged_dead_while_scored(examples):
        running = search.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if (
            running and running[0].number == 0
        ):  # what a peer's fail_stale does to a trial with late heartbeats
            search.study.tell(0, state=TrialState.FAIL)
        return score(examples)

    search.evaluator.score_examples = judged_dead_while_scored
    with caplog.at_level("WARNING", logger="evomerge.search.loop"):
        search.run(until=3, progress=False)
    assert [t.state.name for t in search.study.trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert "trial 0 was failed by another worker while it ran here" in caplog.text


def test_a_worker_whose_budget_is_met_waits_out_a_dead_peers_trial(tmp_path, small_pool, caplog):
    """A peer died mid-trial just before the budget was met: the last worker does not leave
    that trial RUNNING; it waits out the grace period, fails it and runs its retry."""
    from evomerge.search.config import load_run_config
    from evomerge.search.loop import Search
    from evomerge.search.run_folder import write_run_folder

    run_dir = tmp_path / "run"
    config = load_run_config(
        write_config(
            tmp_path,
            small_pool,
            trials=1,
            baselines=False,
            sampler="random",
            heartbeat_seconds=1,
            grace_seconds=2,
        )
    )
    set_up_like_the_cli(config, run_dir)
    write_run_folder(config, run_dir)
    search = Search(config, run_dir)
    orphan = search.study.ask()  # the dead peer's trial: a genome, then no heartbeat ever
    genome = {g.name: orphan.suggest_float(g.name, g.low, g.high) for g in search.space.genes}
    search.run(until=0, progress=False)  # the budget is met already
    trials = search.study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].system_attrs["failed_trial"] == orphan.number and trials[1].params == genome
    assert f"waiting for trial(s) [{orphan.number}] of another worker" in caplog.text


def test_failing_candidates_are_recorded_and_the_search_goes_on(tmp_path, small_pool):
    space = {
        "method": "della",
        "search": {"density": [0.05, 0.95], "weight": [0.0, 1.0]},
        "fixed": {"epsilon": 0.3},
    }
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path, small_pool, space=space, trials=10, baselines=False, sampler="random"
    )
    evomerge("search", str(config), "--run-dir", str(run_dir))
    trials = trials_of(run_dir)
    assert len(trials) == 10
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert failed and all("della needs" in t.user_attrs["fail_reason"] for t in failed)
    assert any(t.state.name == "COMPLETE" for t in trials)


def test_resume_refuses_a_changed_pool(tmp_path, small_pool):
    import shutil

    pool = tmp_path / "pool"
    shutil.copytree(small_pool, pool)
    run_dir = tmp_path / "run"
    evomerge("search", str(write_config(tmp_path, pool, trials=1)), "--run-dir", str(run_dir))
    weights = pool / "rev" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)
    weights.write_bytes(bytes(data))
    result = evomerge("resume", str(run_dir), check=False)
    assert result.returncode == 2
    assert "pool changed" in result.stderr and "rev" in result.stderr


def test_multi_objective_search_exports_from_the_pareto_front(tmp_path, small_pool):
    import optuna

    from evomerge.search.study import best_trial, pareto_front

    run_dir = tmp_path / "run"
    config = write_config(tmp_path, small_pool, trials=8, sampler="tpe", objectives="per_task")
    evomerge("search", str(config), "--run-dir", str(run_dir))
    study = optuna.load_study(study_name="evomerge", storage=f"sqlite:///{run_dir / 'study.db'}")
    assert len(study.directions) == 3  # one objective per task
    chosen = best_trial(study)
    front = {t.number for t in study.best_trials}
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    assert {t.number for t in pareto_front(complete, study.directions)} == front
    assert chosen.number in front
    assert chosen.user_attrs["fitness"] == max(
        t.user_attrs["fitness"]
        for t in study.best_trials
        if t.user_attrs.get("fidelity") == chosen.user_attrs["fidelity"]
    )
    evomerge("export", str(run_dir), str(tmp_path / "out"))
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_ctrl_c_stops_cleanly_and_resume_continues(tmp_path, small_pool):
    run_dir = tmp_path / "run"
    # a budget no search ends before the signal: a trial of the small pool can take 0.07 s
    config = write_config(tmp_path, small_pool, trials=10_000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "evomerge", "search", str(config), "--run-dir", str(run_dir)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # as from a terminal: a test run in the background (`cmd &` in a script) has SIGINT
        # ignored, the child inherits that, and Python then never raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    wait_for_completed(run_dir, 2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "evomerge resume" in stderr
    trials = trials_of(run_dir)
    assert all(t.state.name != "RUNNING" for t in trials)  # (queued baselines stay WAITING)
    finished = sum(t.state.name in ("COMPLETE", "FAIL") for t in trials)
    evomerge("resume", str(run_dir), "--trials", "1")
    assert sum(t.state.name in ("COMPLETE", "FAIL") for t in trials_of(run_dir)) == finished + 1


def test_a_new_search_refuses_a_study_another_run_started(tmp_path, small_pool):
    shared = f"journal:{tmp_path / 'shared-study.log'}"
    config = write_config(tmp_path, small_pool, trials=1, storage=shared)
    evomerge("search", str(config), "--run-dir", str(tmp_path / "first"))
    second = evomerge("search", str(config), "--run-dir", str(tmp_path / "second"), check=False)
    assert second.returncode == 2
    assert "already holds a study named 'evomerge'" in second.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "second").exists()


def test_sampler_multi_is_refused_with_what_to_write_instead(tmp_path, small_pool):
    for search, words in (
        ({"sampler": "multi"}, "objectives: per_task"),
        ({"sampler": "cmaes", "objectives": "per_task"}, "sampler: tpe"),
    ):
        run_dir = tmp_path / f"run-{len(words)}"
        result = evomerge(
            "search",
            str(write_config(tmp_path, small_pool, **search)),
            "--run-dir",
            str(run_dir),
            check=False,
        )
        assert result.returncode == 2
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("error: ") and words in line, result.stderr
        assert not run_dir.exists()


def test_the_terminal_shows_the_search_and_the_log_file_the_libraries(tmp_path, small_pool):
    """Quiet by default: one progress bar and a line per new best; lm-eval's bars and logs go to
    the run folder's log; `-v` brings them back. Each trial keeps its per-example scores."""
    import json

    run_dir = tmp_path / "run"
    config = write_config(tmp_path, small_pool, trials=3, sampler="random")
    quiet = evomerge("search", str(config), "--run-dir", str(run_dir))
    # the libraries' bars (transformers loading weights, lm-eval building its requests once)
    assert "Loading weights" not in quiet.stderr and "150/150" not in quiet.stderr
    assert "new best: trial #0, fitness" in quiet.stderr and "search: 100%" in quiet.stderr
    assert "Loading weights" in (run_dir / "search.log").read_text()
    for trial in [t for t in trials_of(run_dir) if t.state.name == "COMPLETE"]:
        kept = json.loads((run_dir / "examples" / f"{trial.number}.json").read_text())["tasks"]
        assert sum(len(task["docs"]) for task in kept.values()) == trial.user_attrs["examples"]
        assert all(len(task["docs"]) == len(task["values"]) for task in kept.values())

    verbose = evomerge("-v", "resume", str(run_dir), "--trials", "1")
    assert "Loading weights" in verbose.stderr
