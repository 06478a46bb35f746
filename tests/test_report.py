"""`evomerge report` on real Optuna studies built trial by trial: no model is run (held-out
scoring, the one step that would load one, is replaced by a stand-in where it is reached)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

os.environ.setdefault("OMP_NUM_THREADS", "1")

from evomerge.errors import UserError
from evomerge.results.plots import PLOTS
from evomerge.results.report import make_report, report_run
from evomerge.results.summary import multi_fidelity_saving
from evomerge.search.run_folder import RunGenes
from evomerge.spaces.parameters.space import SearchSpace, load_space

TASKS = ("evomerge_add", "evomerge_rev", "evomerge_sort")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    import torch

    torch.set_num_threads(1)


def make_space(name: str = "dare_ties_layers", models=None, num_layers: int = 4) -> SearchSpace:
    return SearchSpace(
        load_space(name),
        base="b",
        models=models or {"a": "pa", "b2": "pb"},
        num_layers=num_layers,
        dtype="float32",
    )


def add_trial(
    study, space, genome, *, fitness=None, fidelity="full", baseline=None, examples=None, fail=None
):
    """One finished trial with the attributes `Search.trial` records."""
    import optuna
    from optuna.distributions import FloatDistribution

    attrs = {}
    if baseline:
        attrs["baseline"] = baseline
    if fail:
        attrs["fail_reason"] = fail
    else:
        per_task = {task: round(fitness + 0.1 * (i - 1), 6) for i, task in enumerate(TASKS)}
        attrs.update(fidelity=fidelity, fitness=fitness, per_task=per_task)
    if examples is not None:
        attrs["examples"] = examples
    multi = len(study.directions) > 1
    trial = optuna.trial.create_trial(
        params=genome,
        distributions={g.name: FloatDistribution(g.low, g.high) for g in space.genes},
        value=None if fail or multi else fitness,
        values=[attrs["per_task"][t] for t in TASKS] if multi and not fail else None,
        state=optuna.trial.TrialState.FAIL if fail else optuna.trial.TrialState.COMPLETE,
        user_attrs=attrs,
    )
    study.add_trial(trial)
    return study.trials[-1].number


def random_genome(space: SearchSpace, rng: random.Random) -> dict[str, float]:
    return {g.name: rng.uniform(g.low, g.high) for g in space.genes}


def build_study(
    storage: str, space: SearchSpace, *, directions=("maximize",), examples: bool = True
):
    """Baselines, then searched trials: a trial stopped early scores highest, but the best
    full evaluation (0.8) is the one `export` takes. Full trials score 100 examples, those
    stopped early 20."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name="evomerge", directions=list(directions))
    rng = random.Random(0)
    fitness = {"uniform": 0.5, "dare_ties_0.5": 0.55, "only_a": 0.3, "only_b2": 0.35}
    for label, genome in space.baselines().items():
        if label.startswith("lambda_"):  # task arithmetic's scalings: not this study's story
            continue
        add_trial(
            study,
            space,
            genome,
            fitness=fitness.get(label, 0.3),
            baseline=label,
            examples=100 if examples else None,
        )
    plan = [(0.6, "subset"), (0.8, "full"), (0.95, "subset"), (0.4, "subset"), (0.7, "full")]
    numbers = {}
    for value, fidelity in plan:
        numbers[value] = add_trial(
            study,
            space,
            random_genome(space, rng),
            fitness=value,
            fidelity=fidelity,
            examples=(100 if fidelity == "full" else 20) if examples else None,
        )
    add_trial(
        study,
        space,
        random_genome(space, rng),
        fail="CandidateError: the fitness is not a finite number",
    )
    return study, numbers


def check_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width = imread(path).shape[:2]
    assert height > 100 and width > 100


def test_report_on_a_study(tmp_path: Path):
    space = make_space()
    study, numbers = build_study(f"sqlite:///{tmp_path / 'study.db'}", space)
    report = make_report(study, RunGenes.of(space), tmp_path / "out", top=4, title="demo")

    for name in PLOTS:
        check_png(tmp_path / "out" / name)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (
        summary["best"]["number"] == numbers[0.8]
    )  # the best *full* evaluation, not the 0.95 subset one
    assert summary["best"]["fitness"] == pytest.approx(0.8)
    assert summary["best"]["per_task"] == pytest.approx(
        {"evomerge_add": 0.7, "evomerge_rev": 0.8, "evomerge_sort": 0.9}
    )
    # Full evaluations (the baselines among them) rank before the 0.95 and 0.6 subset scores.
    assert [row["fitness"] for row in summary["top"]] == pytest.approx([0.8, 0.7, 0.55, 0.5])
    assert "complete trials by fitness, full evaluations first" in report.text
    assert {b["baseline"]: b["fitness"] for b in summary["baselines"]} == pytest.approx(
        {"uniform": 0.5, "dare_ties_0.5": 0.55, "only_a": 0.3, "only_b2": 0.35}
    )
    assert summary["counts"] == {
        "trials": 10,
        "complete": 9,
        "failed": 1,
        "running": 0,
        "full_evaluations": 6,
        "subset_only": 3,
    }
    assert summary["multi_fidelity"] == {
        "subset_only_fraction": pytest.approx(3 / 9),
        "examples_scored": 6 * 100 + 3 * 20,
        "examples_full_fidelity": 9 * 100,
    }

    for label in ("uniform", "dare_ties_0.5", "only_a", "only_b2"):
        assert label in report.text
    assert (
        "3 of 9 trials (33%) stopped before all of dev; 660 of 900 examples scored (1.4x fewer)"
        in report.text
    )
    assert "9 complete, 1 failed, 6 full evaluations" in report.text
    best_line = next(line for line in report.text.splitlines() if line.startswith("*"))
    assert best_line.split()[1] == str(numbers[0.8])


def test_saving_is_unknown_without_example_counts(tmp_path: Path):
    space = make_space()
    study, _ = build_study(f"sqlite:///{tmp_path / 'study.db'}", space, examples=False)
    report = make_report(study, RunGenes.of(space), tmp_path / "out")
    assert report.summary["multi_fidelity"]["examples_scored"] is None
    assert "saving unknown" in report.text
    assert multi_fidelity_saving([])["subset_only_fraction"] is None


@pytest.mark.parametrize(
    "space_name, models, rows",
    [
        ("dare_ties_layers_split", {"a": "pa", "b2": "pb"}, 2 * 2 * 2),  # params x models x parts
        ("slerp_layers", {"a": "pa"}, 1),  # one per-group parameter
        ("linear_global", {"a": "pa", "b2": "pb", "c": "pc"}, 3),  # a single group "all"
    ],
)
def test_genome_heat_map_for_other_spaces(tmp_path: Path, space_name, models, rows):
    from optuna.trial import TrialState

    space = make_space(space_name, models, num_layers=6)
    assert len({(g.param, g.model, g.part) for g in space.genes}) == rows
    study, _ = build_study(f"sqlite:///{tmp_path / 'study.db'}", space, examples=False)
    assert any(t.state == TrialState.COMPLETE for t in study.trials)
    make_report(study, RunGenes.of(space), tmp_path / "out")
    check_png(tmp_path / "out" / "genome.png")


def test_multi_objective_study(tmp_path: Path):
    space = make_space()
    study, _ = build_study(
        f"sqlite:///{tmp_path / 'study.db'}", space, directions=("maximize",) * 3
    )
    report = make_report(study, RunGenes.of(space), tmp_path / "out")
    front = report.summary["pareto_front"]
    assert front and report.summary["best"]["number"] in front
    assert "Pareto front" in report.text


def test_no_completed_trial_is_a_user_error(tmp_path: Path):
    import optuna

    space = make_space()
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="evomerge")
    add_trial(study, space, random_genome(space, random.Random(1)), fail="CandidateError: boom")
    with pytest.raises(UserError, match="no completed trial"):
        make_report(study, RunGenes.of(space), tmp_path / "out")
    assert not (tmp_path / "out" / "summary.json").exists()


# --- the command, on a run folder made by hand (config.yaml, run.json, study.db) --------------
def make_run_folder(run_dir: Path, *, trials: bool = True, pool: Path | None = None) -> Path:
    """A run folder whose pool is gone, or with `pool`, one whose pool folders exist (empty:
    anything that loads a model from them fails)."""
    from evomerge.io.fingerprint import pool_fingerprints
    from evomerge.search.config import RunConfig
    from evomerge.search.run_folder import RUN_FORMAT

    run_dir.mkdir()
    where = pool or Path("/nowhere")
    for name in ("base", "a", "b") if pool else ():
        (where / name).mkdir(parents=True)
    config = {
        "pool": {
            "base": str(where / "base"),
            "models": {"a": str(where / "a"), "b2": str(where / "b")},
        },
        "space": "dare_ties_layers",
        "fitness": {"tasks": list(TASKS)},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "pool.json").write_text(
        json.dumps(pool_fingerprints(RunConfig.model_validate(config)))
    )
    space = make_space()
    meta = {
        "run_format": RUN_FORMAT,
        "evomerge_version": "test",
        "space": RunGenes.of(space).to_json(),
    }
    (run_dir / "run.json").write_text(json.dumps(meta))
    if trials:
        build_study(f"sqlite:///{run_dir / 'study.db'}", space)
    else:
        import optuna

        optuna.create_study(storage=f"sqlite:///{run_dir / 'study.db'}", study_name="evomerge")
    return run_dir


def test_cli_report(tmp_path: Path):
    from evomerge.cli import cli

    run_dir = make_run_folder(tmp_path / "run")
    result = CliRunner().invoke(cli, ["report", str(run_dir), "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "top 3 of 9 complete trials" in result.output
    assert f"optuna-dashboard sqlite:///{(run_dir / 'study.db').resolve()}" in result.output
    for name in (*PLOTS, "summary.json"):
        assert (run_dir / "report" / name).is_file()
    assert len(json.loads((run_dir / "report" / "summary.json").read_text())["top"]) == 3

    result = CliRunner().invoke(cli, ["report", str(run_dir), "--out", str(tmp_path / "elsewhere")])
    assert result.exit_code == 0, result.output
    check_png(tmp_path / "elsewhere" / "history.png")


def test_report_and_export_read_a_run_without_torch_or_the_search(tmp_path: Path):
    """Reading a study (report; export up to the merge itself) loads no torch, no search,
    no candidate and no lm-eval, and draws the genome from the gene list in run.json."""
    import subprocess
    import sys

    run_dir = make_run_folder(tmp_path / "run")
    code = f"""
import sys
from evomerge.results.export import pick_trial
from evomerge.results.report import report_run

report = report_run({str(run_dir)!r})
config, trial = pick_trial({str(run_dir)!r})
heavy = ("torch", "transformers", "lm_eval", "evomerge.search.loop",
         "evomerge.spaces.parameters.candidate", "evomerge.spaces.parameters.space",
         "evomerge.merging.executor", "evomerge.fitness.prepared")
loaded = [name for name in heavy if name in sys.modules]
assert not loaded, loaded
print(trial.number, report.summary["best"]["number"])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    exported, best = done.stdout.split()
    assert exported == best
    check_png(run_dir / "report" / "genome.png")


# --- held-out scoring: the one step of `report` that loads a model -------------------------------
def test_the_help_says_what_report_loads():
    from evomerge.cli import cli

    result = CliRunner().invoke(cli, ["report", "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "--no-held-out" in text and "loads the pool's base model" in text
    assert "Loads no model" not in text


def test_no_held_out_loads_no_model_even_with_the_pool_on_disk(tmp_path: Path):
    """`report --no-held-out` in a fresh process: the table, plots and summary.json, and no
    torch, transformers, lm-eval or held-out scoring imported, though the pool is there."""
    import subprocess
    import sys

    run_dir = make_run_folder(tmp_path / "run", pool=tmp_path / "pool")
    code = f"""
import sys
from evomerge.cli import cli

cli.main(["report", {str(run_dir)!r}, "--no-held-out"], standalone_mode=False)
heavy = ("torch", "transformers", "lm_eval", "evomerge.results.heldout")
loaded = [name for name in heavy if name in sys.modules]
assert not loaded, loaded
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "top 9 of 9 complete trials" in done.stdout and "held-out" not in done.stdout
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    assert "held_out" not in summary and summary["best"] is not None
    assert not (run_dir / "heldout").exists()


class StandInHeldOut:
    """`results.heldout.HeldOut` without a model: each construction is logged in `events`."""

    events: list[str] = []
    held_out = dict.fromkeys(TASKS, True)

    def __init__(self, config, run_dir) -> None:
        self.events.append("model loaded")

    def score(self, genome, *trial_attrs):
        return {"dev": 0.5, "test": 0.4}

    def describe(self, scores):
        return {
            split: {"value": v, "per_task": dict.fromkeys(TASKS, v), "se": {}, "n_examples": 9}
            for split, v in scores.items()
        }

    def compare(self, a, b):
        return {split: {"difference": 0.0, "se": 0.01, "p_not_better": 0.5} for split in a}


def test_report_announces_the_model_before_loading_it(tmp_path: Path, monkeypatch):
    """One line before the model loads, then the scores; a second report reads them from
    RUN_DIR/heldout/ and neither loads nor announces anything."""
    import evomerge.results.heldout as heldout

    monkeypatch.setattr(heldout, "HeldOut", StandInHeldOut)
    events = StandInHeldOut.events = []
    run_dir = make_run_folder(tmp_path / "run", pool=tmp_path / "pool")
    report = report_run(run_dir, say=events.append)
    assert len(events) == 2 and events[1] == "model loaded"
    assert events[0].startswith("held-out scores: loading the model to score #")
    assert report.summary["held_out"]["trials"][0]["test"]["value"] == 0.4
    assert "dev chose, test held out" in report.text

    events.clear()
    assert report_run(run_dir, say=events.append).summary["held_out"] == report.summary["held_out"]
    assert events == []


def test_cli_report_announces_the_model_on_the_terminal(tmp_path: Path, monkeypatch):
    import evomerge.results.heldout as heldout
    from evomerge.cli import cli

    monkeypatch.setattr(heldout, "HeldOut", StandInHeldOut)
    run_dir = make_run_folder(tmp_path / "run", pool=tmp_path / "pool")
    result = CliRunner().invoke(cli, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    announced = [line for line in result.stderr.splitlines() if "loading the model" in line]
    assert len(announced) == 1 and announced[0].endswith("(--no-held-out skips this)")
    assert "dev chose, test held out" in result.stdout


def test_a_run_folder_without_a_gene_list_is_a_user_error(tmp_path: Path):
    run_dir = make_run_folder(tmp_path / "run")
    meta = json.loads((run_dir / "run.json").read_text())
    del meta["space"]
    (run_dir / "run.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="has no gene list"):
        report_run(run_dir)


def test_cli_bad_inputs(tmp_path: Path):
    from evomerge.cli import cli

    with pytest.raises(UserError, match="not an evomerge run folder"):
        report_run(tmp_path)
    empty = make_run_folder(tmp_path / "empty", trials=False)
    result = CliRunner().invoke(cli, ["report", str(empty)])
    assert isinstance(result.exception, UserError) and "no completed trial" in str(result.exception)
    result = CliRunner().invoke(cli, ["report", str(empty), "--top", "0"])
    assert result.exit_code == 2


@pytest.mark.slow
def test_cli_report_on_a_real_search(tmp_path: Path, small_pool: Path):
    """`evomerge search` on the small demo pool, then `evomerge report` in a fresh process."""
    import subprocess
    import sys

    config = {
        "pool": {
            "base": str(small_pool / "base"),
            "models": {n: str(small_pool / n) for n in ("add", "rev")},
        },
        "space": "dare_ties_layers",
        "fitness": {
            "task_paths": [str(small_pool / "tasks")],
            "tasks": list(TASKS),
            "subset": {"count": 8},
        },
        "search": {
            "sampler": "cmaes",
            "trials": 6,
            "seed": 0,
            "fidelity": {"eta": 2},
        },
        "threads": 1,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    for args in (
        ["search", str(tmp_path / "run.yaml"), "--run-dir", str(run_dir)],
        ["report", str(run_dir)],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "evomerge", *args],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    assert "uniform" in done.stdout and "only_add" in done.stdout
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    assert summary["counts"]["complete"] + summary["counts"]["failed"] == 6
    assert {b["baseline"] for b in summary["baselines"]} >= {"uniform", "only_add", "only_rev"}
    for name in PLOTS:
        check_png(run_dir / "report" / name)


def test_a_retried_baseline_is_listed_once_with_its_completed_run():
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from evomerge.results.summary import baseline_trials

    dist = {"x": FloatDistribution(0, 1)}
    killed = create_trial(
        params={"x": 0.5},
        distributions=dist,
        state=TrialState.FAIL,
        user_attrs={"baseline": "uniform"},
    )
    retry = create_trial(
        params={"x": 0.5}, distributions=dist, value=0.3, user_attrs={"baseline": "uniform"}
    )
    other = create_trial(
        params={"x": 1.0}, distributions=dist, value=0.2, user_attrs={"baseline": "only_a"}
    )
    assert baseline_trials([killed, retry, other]) == [retry, other]
