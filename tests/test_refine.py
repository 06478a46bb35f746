"""Learned merging by gradient (`search.refine: gradient`): real pool, real lm-eval, real SQLite.

The gradient matches finite differences; the refined trial is a trial of the study (stored,
told, scored on all of dev); it resumes after an interruption; its exported recipe (per-tensor
`filter` values) makes the scored model bit for bit; unsupported runs are refused when read;
the unsupervised entropy objective lowers the held-out entropy and refines a task without
answers, which the answer NLL refuses in one sentence.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.pool_fixtures import pool_search_config

pytestmark = pytest.mark.slow

TASKS = ["evomerge_add", "evomerge_rev", "evomerge_sort"]
FAST = {"steps": 4, "eval_every": 2, "patience": 2, "batch": 16, "lr": 0.2}


def config_of(pool: Path, tmp: Path, *, space="task_arithmetic_layers", refine=None, **search):
    from evomerge.search.config import load_run_config

    data = pool_search_config(
        pool,
        space=space,
        tasks=TASKS,
        subset=8,
        batch_size=32,
        search={
            "sampler": "random",
            "trials": 5,
            "seed": 1,
            "refine": refine,
            "baselines": False,  # queued baselines may outnumber a 5-trial budget
            **search,
        },
    )
    path = tmp / f"config-{len(list(tmp.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_run_config(path), path


def new_search(config, run_dir: Path, *, create=True):
    import torch

    from evomerge.cli.process import set_up_process
    from evomerge.search.loop import Search
    from evomerge.search.run_folder import write_run_folder

    torch.set_num_threads(1)
    set_up_process(threads=1, hf_home=run_dir / "hf", offline=True)
    if create:
        write_run_folder(config, run_dir)
    return Search(config, run_dir, create=create)


def refined_trials(study):
    from evomerge.spaces.refine import REFINED_ATTR

    return [t for t in study.get_trials(deepcopy=False) if REFINED_ATTR in t.user_attrs]


@pytest.mark.parametrize("space", ["task_arithmetic_layers", "ties_layers"])
def test_the_gradient_matches_finite_differences(tmp_path, small_pool, space):
    """Through the model, on the teacher-forced loss. TIES's elected signs are piecewise
    constant in the weights, so its loss jumps where one flips: its finite differences use a
    step too small to flip one (`test_a_term_gradient_is_exact` checks every rule in float64)."""
    import torch

    from evomerge.fitness.teacher import make_batch
    from evomerge.spaces.refine.merge import DifferentiableMerge

    config, _ = config_of(small_pool, tmp_path, space=space, refine={"l2": 0.5})
    search = new_search(config, tmp_path / "run")
    genome = {g.name: 0.3 + 0.4 * (i % 3) / 2 for i, g in enumerate(search.space.genes)}
    merge = DifferentiableMerge(search.candidate, genome)

    # at the start, the differentiable merge is the executor's merge
    search.candidate.apply(genome)
    merged = merge.merged(merge.start)
    for name, target in search.candidate.targets.items():
        torch.testing.assert_close(merged[name], target.float(), rtol=1e-5, atol=1e-6)

    refiner = search.refiner
    batch = make_batch(refiner.train[:12])
    w = merge.start.clone().requires_grad_(True)
    with torch.no_grad():
        w[0, 0] += 0.05  # away from the start, so the l2 pull has a gradient too
    refiner._loss(merge, w, batch).backward()
    for j, m in [(0, 0), (len(merge.names) // 2, 1), (len(merge.names) - 1, 2)]:
        eps = 1e-2 if space == "task_arithmetic_layers" else 1e-3
        up, down = w.detach().clone(), w.detach().clone()
        up[j, m] += eps
        down[j, m] -= eps
        with torch.no_grad():
            numeric = (refiner._loss(merge, up, batch) - refiner._loss(merge, down, batch)) / (
                2 * eps
            )
        assert w.grad[j, m].item() == pytest.approx(numeric.item(), rel=0.05, abs=2e-4), (
            merge.names[j],
            m,
        )


@pytest.mark.parametrize("consensus, normalize", [(False, False), (True, True), (True, False)])
def test_a_term_gradient_is_exact(consensus, normalize):
    """theta(w) of one tensor against finite differences in float64 (torch.autograd.gradcheck):
    task arithmetic, TIES-style consensus with and without normalisation."""
    import torch

    from evomerge.spaces.refine.merge import _Term

    gen = torch.Generator().manual_seed(0)
    term = _Term(
        name="t",
        base=torch.randn(6, 5, generator=gen, dtype=torch.float64),
        deltas=torch.randn(3, 6, 5, generator=gen, dtype=torch.float64),
        consensus=consensus,
        normalize=normalize,
        lambda_=0.8,
    )
    w = torch.tensor([0.3, 0.7, 0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(term.merged, (w,), eps=1e-6, atol=1e-7)


def test_a_refined_trial_is_a_trial_of_the_study_and_exports_bit_for_bit(tmp_path, small_pool):
    import torch
    from safetensors.torch import load_file

    from evomerge.merging.executor import run_merge
    from evomerge.merging.recipe import load_recipe
    from evomerge.results.export import export_trial
    from evomerge.search.refine import apply_trial
    from evomerge.search.study import best_trial
    from evomerge.spaces.refine import REFINED_ATTR

    config, _ = config_of(small_pool, tmp_path, refine=FAST)
    run_dir = tmp_path / "run"
    search = new_search(config, run_dir)
    search.run(until=5, progress=False)

    trials = search.study.get_trials(deepcopy=False)
    (refined,) = refined_trials(search.study)
    assert refined.state.name == "COMPLETE" and refined.value is not None
    assert refined.user_attrs["fidelity"] == "full"  # scored on every dev example
    assert (run_dir / "examples" / f"{refined.number}.json").is_file()
    stats = refined.user_attrs["refine"]
    start = trials[stats["from_trial"]]
    assert start.number == best_trial(search.study, [t for t in trials if t is not refined]).number
    assert refined.params == start.params
    assert stats["train_passes"] == stats["steps"] * FAST["batch"]
    assert len(trials) == 6  # the budget, then the refinement once

    # another run() over a met budget does not refine again
    search.run(until=5, progress=False)
    assert len(refined_trials(search.study)) == 1

    weights = refined.user_attrs[REFINED_ATTR]
    assert set(weights) == set(search.candidate.targets)
    apply_trial(search.candidate, refined.params, refined.user_attrs)
    scored = {name: t.detach().clone() for name, t in search.candidate.targets.items()}
    said = []
    export_trial(run_dir, tmp_path / "export", trial_number=refined.number, say=said.append)
    # the report's table: the refined trial beside its black-box start, paired on the same examples
    table = "\n".join(said)
    assert f"#{refined.number} (refined from #{start.number})" in table
    assert f"- #{start.number} (its black-box start), paired: dev" in table
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert exported.keys() == scored.keys()
    assert all(torch.equal(exported[k], scored[k]) for k in scored)

    recipe_text = (tmp_path / "export" / "recipe.yaml").read_text()
    assert "filter: model.layers.0.self_attn.q_proj.weight" in recipe_text
    run_merge(load_recipe(tmp_path / "export" / "recipe.yaml"), tmp_path / "again", seed=0)
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(torch.equal(again[k], exported[k]) for k in exported)


@pytest.mark.parametrize("space", ["ties_layers", "dare_ties_layers"])
def test_per_tensor_weights_export_bit_for_bit(tmp_path, small_pool, space):
    """Arbitrary per-tensor weights (not only what a short refinement finds), with TIES's
    trimming and sign election and DARE's seeded drops: the recipe makes the applied model."""
    import random

    import torch

    from evomerge.merging.executor import run_merge
    from evomerge.spaces.refine.recipe import apply_refined, refined_recipe

    config, _ = config_of(small_pool, tmp_path, space=space)
    search = new_search(config, tmp_path / "run")
    rng = random.Random(0)
    genome = {g.name: rng.uniform(g.low, g.high) for g in search.space.genes}
    weights = {name: [rng.random() for _ in range(3)] for name in search.candidate.targets}
    apply_refined(search.candidate, genome, weights)
    recipe = refined_recipe(search.space, genome, weights)
    out = run_merge(recipe, tmp_path / "merged", seed=config.search.merge_seed).out_dir
    from safetensors.torch import load_file

    merged = load_file(str(Path(out) / "model.safetensors"))
    assert all(torch.equal(merged[k], t) for k, t in search.candidate.targets.items())


def test_an_interrupted_refinement_restarts_on_resume(tmp_path, small_pool):
    from evomerge.search.refine import Refiner

    config, _ = config_of(small_pool, tmp_path, refine=FAST)
    run_dir = tmp_path / "run"
    search = new_search(config, run_dir)
    calls = []
    real_loss = Refiner._loss

    def interrupted(self, *args):  # Ctrl-C in the middle of the refinement
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_loss(self, *args)

    Refiner._loss = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            search.run(until=5, progress=False)
    finally:
        Refiner._loss = real_loss
    before = {t.number: t.value for t in search.study.trials if t.state.name == "COMPLETE"}
    assert len(before) == 5 and not refined_trials(search.study)  # nothing of it was stored

    resumed = new_search(config, run_dir, create=False)
    resumed.run(until=5, progress=False)
    after = resumed.study.get_trials(deepcopy=False)
    assert {n: after[n].value for n in before} == before
    (refined,) = refined_trials(resumed.study)
    assert refined.state.name == "COMPLETE"
    assert all(t.state.name != "RUNNING" for t in after)


def test_a_refined_trial_enqueued_before_a_kill_is_scored_on_resume(tmp_path, small_pool):
    config, _ = config_of(small_pool, tmp_path, refine=FAST)
    run_dir = tmp_path / "run"
    search = new_search(config, run_dir)
    search.run(until=5, progress=False)
    assert len(refined_trials(search.study)) == 1
    # a second study where the process died right after enqueueing the refined trial
    config2, _ = config_of(small_pool, tmp_path, refine=FAST, study_name="second")
    other = new_search(config2, run_dir)
    for _ in range(5):  # the budget, trial by trial (run() would refine at once)
        other.trial(other.study.get_trials(deepcopy=False))
    assert other.refiner.queue(other.study, other.study.get_trials(deepcopy=False))
    waiting = refined_trials(other.study)
    assert [t.state.name for t in waiting] == ["WAITING"]

    resumed = new_search(config2, run_dir, create=False)
    resumed.run(until=5, progress=False)
    assert [t.state.name for t in refined_trials(resumed.study)] == ["COMPLETE"]


def test_no_refinement_while_baselines_wait_beyond_the_budget(tmp_path, small_pool):
    """The study asks the oldest waiting trial first: a refined trial queued behind baselines
    would run them all past the budget, so the refinement waits for a budget that covers them."""
    config, _ = config_of(small_pool, tmp_path, refine=FAST, baselines=True, trials=2)
    search = new_search(config, tmp_path / "run")
    search.run(until=2, progress=False)
    states = [t.state.name for t in search.study.get_trials(deepcopy=False)]
    assert states.count("COMPLETE") == 2 and "WAITING" in states
    assert not refined_trials(search.study)


@pytest.mark.parametrize(
    "space, extra, words",
    [
        ("dataflow", {}, "kind 'dataflow'"),
        ("method_per_group", {}, "kind 'method_per_group'"),
        ("linear_global", {}, "method is 'linear'"),
        ("slerp_layers", {}, "method is 'slerp'"),
        ("task_arithmetic_layers", {"objectives": "per_task", "sampler": "tpe"}, "objectives"),
    ],
)
def test_unsupported_runs_are_refused_when_the_config_is_read(
    tmp_path, small_pool, space, extra, words
):
    from evomerge.errors import UserError

    with pytest.raises(UserError) as refused:
        config_of(small_pool, tmp_path, space=space, refine="gradient", **extra)
    message = str(refused.value)
    assert words in message and "task-vector methods" in message and "\n" not in message


def test_the_cli_refuses_in_one_sentence(tmp_path, small_pool):
    data = pool_search_config(
        small_pool,
        space="linear_global",
        tasks=TASKS,
        subset=8,
        search={"refine": "gradient"},
    )
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    result = subprocess.run(
        [sys.executable, "-m", "evomerge", "search", str(path), "--run-dir", str(tmp_path / "r")],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "search.refine: gradient" in lines[0]
    assert not (tmp_path / "r").exists()


def test_the_entropy_objective_lowers_the_entropy_on_the_dev_fold(tmp_path, small_pool):
    """`objective: entropy` reads no answer (each document's context alone) and lowers the
    held-out fold's mean entropy where each answer starts, the weights it keeps being the
    best on that fold."""
    import torch

    from evomerge.spaces.refine.merge import DifferentiableMerge

    refine = {**FAST, "steps": 8, "objective": "entropy"}
    config, _ = config_of(small_pool, tmp_path, refine=refine)
    search = new_search(config, tmp_path / "run")
    refiner = search.refiner
    assert all(
        e.n_answer == 0 for e in refiner.train + [e for b in refiner.held for e in b.examples]
    )
    # the entropy is taken where each context ends, i.e. where its answer would start
    batch = refiner.held[0]
    logits = torch.randn(*batch.inputs.shape, 7, generator=torch.Generator().manual_seed(0))
    for row, e in enumerate(batch.examples):
        assert batch.inputs[row, batch.last[row]] == e.tokens[-1]
        want = torch.distributions.Categorical(logits=logits[row, batch.last[row]]).entropy()
        assert batch.entropy(logits)[row].item() == pytest.approx(want.item(), rel=1e-5)

    genome = {g.name: 0.5 for g in search.space.genes}
    result = refiner.refine(genome)
    assert result.stats["objective"] == "entropy" and result.stats["changed"]

    merge = DifferentiableMerge(search.candidate, genome)

    def held_out_entropy(w: torch.Tensor) -> float:
        with torch.no_grad():
            weights = merge.merged(w)
            values = [b.entropy(refiner._logits(weights, b.inputs)) for b in refiner.held]
        return float(torch.cat(values).mean())

    refined = torch.tensor([result.weights[name] for name in merge.names])
    before, after = held_out_entropy(merge.start), held_out_entropy(refined)
    assert after < before
    assert result.stats["held_out_start"] == pytest.approx(-before, rel=1e-5)
    assert result.stats["held_out_refined"] == pytest.approx(-after, rel=1e-5)


def _blank_task_config(tmp_path: Path, pool: Path, refine: dict) -> Path:
    """A run over one task whose documents have no target answer: the add skill's prompts,
    generated until '.', scored by exact match against an empty target."""
    import shutil

    tasks = tmp_path / "tasks"
    shutil.copytree(pool / "tasks", tasks, dirs_exist_ok=True)
    (tasks / "blank.yaml").write_text(
        "task: blank\n"
        "dataset_path: json\n"
        "dataset_kwargs: {data_files: {dev: data/add_dev.jsonl, test: data/add_test.jsonl}}\n"
        "validation_split: dev\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_target: ""\n'
        'generation_kwargs: {until: ["."], max_gen_toks: 4, do_sample: false}\n'
        "metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]\n"
    )
    data = pool_search_config(
        pool,
        space="task_arithmetic_layers",
        tasks=["blank"],
        subset=8,
        batch_size=32,
        search={"sampler": "random", "trials": 2, "seed": 1, "refine": refine, "baselines": False},
    )
    data["fitness"]["task_paths"] = [str(tasks)]
    path = tmp_path / f"blank-{refine.get('objective', 'nll')}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_task_without_answers_refines_by_entropy_and_is_refused_by_nll(tmp_path, small_pool):
    from evomerge.errors import UserError
    from evomerge.search.config import load_run_config

    config = load_run_config(_blank_task_config(tmp_path, small_pool, dict(FAST)))
    with pytest.raises(UserError) as refused:
        new_search(config, tmp_path / "nll")
    message = str(refused.value)
    assert "'blank' has no target answers" in message and "objective: entropy" in message
    assert "\n" not in message

    path = _blank_task_config(tmp_path, small_pool, {**FAST, "objective": "entropy"})
    search = new_search(load_run_config(path), tmp_path / "entropy")
    search.run(until=2, progress=False)
    (refined,) = refined_trials(search.study)
    assert refined.state.name == "COMPLETE"
    assert refined.user_attrs["refine"]["objective"] == "entropy"


def test_an_unknown_objective_is_refused_when_the_config_is_read(tmp_path, small_pool):
    from evomerge.errors import UserError

    with pytest.raises(UserError) as refused:
        config_of(small_pool, tmp_path, refine={"objective": "entropi"})
    message = str(refused.value)
    assert "search.refine.objective" in message and "'entropy'" in message and "\n" not in message


def test_the_config_names_every_task_vector_method():
    from evomerge.search.refine_config import TASK_VECTOR_METHODS as READ
    from evomerge.spaces.refine.merge import TASK_VECTOR_METHODS

    assert set(READ) == set(TASK_VECTOR_METHODS)
