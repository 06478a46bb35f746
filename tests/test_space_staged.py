"""Staged spaces (a method per layer group; merges in pairs with the order searched): the scored
candidate is the model `evomerge merge` makes of the exported stages, bit for bit; mergekit-multi
0.1.5 runs those stages to the same tensors, stage by stage; categorical genes survive resume;
bad spaces are one sentence, exit 2, nothing written."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.errors import UserError
from evomerge.merging.multistage import load_stages, run_stages
from evomerge.merging.recipe import validate_model
from evomerge.spaces.parameters.space import read_space
from evomerge.spaces.staged import (
    MethodPerGroupConfig,
    MethodPerGroupSpace,
    PairwiseConfig,
    PairwiseSpace,
)

KINDS = {
    "method_per_group": (MethodPerGroupSpace, MethodPerGroupConfig),
    "pairwise_sequence": (PairwiseSpace, PairwiseConfig),
}


def staged_space(source, base, models: dict, num_layers: int):
    data, where = read_space(source)
    space_class, config_class = KINDS[
        "method_per_group" if data["kind"] == "method_per_group" else "pairwise_sequence"
    ]
    return space_class(
        validate_model(config_class, data, where),
        base=str(base),
        models=models,
        num_layers=num_layers,
        dtype="float32",
    )


def genomes(space, seed: int) -> list[dict]:
    """Random genomes; for a method-per-group space the first two mix the methods both ways
    round, so the export has a stage per method and the passthrough."""
    rng = random.Random(seed)
    out = [
        {
            g.name: rng.choice(g.choices) if g.choices else rng.uniform(g.low, g.high)
            for g in space.genes
        }
        for _ in range(3)
    ]
    if isinstance(space, MethodPerGroupSpace):
        methods = space.config.methods
        for genome, order in zip(out, (methods, methods[::-1])):
            genome.update(
                {f"{label}.method": order[i % 2] for i, (label, _, _) in enumerate(space.groups)}
            )
    return out


@pytest.mark.parametrize("name", sorted(KINDS))
def test_a_staged_candidate_is_the_merge_of_its_stages(tmp_path, small_pool, name):
    from transformers import AutoModelForCausalLM

    from evomerge.io.checkpoint import Checkpoint
    from evomerge.spaces.staged import staged_candidate

    torch.set_num_threads(1)
    models = {m: str(small_pool / m) for m in ("add", "rev", "sort")}
    data, _ = read_space(name)
    data = {**data, "layers_per_group": 1}  # the small pool's 2 layers: two groups to mix
    space = staged_space(
        data, small_pool / "base", models, Checkpoint(small_pool / "base").num_layers
    )
    model = AutoModelForCausalLM.from_pretrained(small_pool / "base", use_safetensors=True).eval()
    candidate = staged_candidate(model, space, seed=11)
    stage_counts = []
    for attempt, genome in enumerate(genomes(space, seed=len(name))):
        candidate.apply(genome)
        stages = space.decode(genome)
        stage_counts.append(len(stages))
        out = run_stages(stages, tmp_path / f"merged-{attempt}", seed=11).out_dir
        merged = load_file(str(out / "model.safetensors"))
        assert merged.keys() == candidate.targets.keys()
        for tensor, live in candidate.targets.items():
            assert torch.equal(live, merged[tensor]), (tensor, attempt)
        # what the output folder says it was made from reruns to the same model
        again = run_stages(
            load_stages(out / "recipe.yaml"), tmp_path / f"again-{attempt}", seed=11
        ).out_dir
        assert all(
            torch.equal(t, merged[k])
            for k, t in load_file(str(again / "model.safetensors")).items()
        )
    # methods mixed: a stage each, then the passthrough; pairs: S1, then the final merge
    assert stage_counts[:2] == ([3, 3] if name == "method_per_group" else [2, 2])


def test_the_baselines_are_genomes_of_the_space_and_mean_what_they_say():
    models = {m: f"/pool/{m}" for m in ("a", "b", "c")}  # folders are not read
    per_group = staged_space("method_per_group", "/pool/base", models, 4)
    baselines = per_group.baselines()
    assert list(baselines) == ["uniform", "only_a", "only_b", "only_c", "ties_uniform"]
    for genome in baselines.values():
        assert genome.keys() == {g.name for g in per_group.genes}
        per_group.decode(genome)  # every gene admitted
    assert {baselines["ties_uniform"][f"{g}.method"] for g, _, _ in per_group.groups} == {"ties"}

    pairs = staged_space("pairwise_sequence", "/pool/base", models, 4)
    baselines = pairs.baselines()
    assert baselines["uniform"] == {
        "order": "a>b>c",
        "S1.L0-1.t": 0.5,
        "S1.L2-3.t": 0.5,
        "S2.L0-1.t": 1 / 3,
        "S2.L2-3.t": 1 / 3,
    }
    assert baselines["only_a"]["order"] == "b>c>a" and baselines["only_a"]["S2.L0-1.t"] == 1.0
    stages = pairs.decode(baselines["uniform"])
    assert [s.name for s in stages] == ["S1", None]
    assert stages[1].recipe.base_model == "S1"  # slerp: the earlier result is the base


def test_pairwise_with_a_many_model_method_keeps_the_pool_base():
    models = {m: f"/pool/{m}" for m in ("a", "b", "c")}
    space = staged_space(
        {"kind": "pairwise", "method": "ties", "search": {"weight": None, "density": [0.1, 1]}},
        "/pool/base",
        models,
        4,
    )
    assert [g.name for g in space.genes] == [
        "order",
        "S1.all.prev.weight",
        "S1.all.next.weight",
        "S1.all.prev.density",
        "S1.all.next.density",
        "S2.all.prev.weight",
        "S2.all.next.weight",
        "S2.all.prev.density",
        "S2.all.next.density",
    ]
    genome = {**space.baselines()["uniform"], "order": "c>a>b"}
    first, final = space.decode(genome)
    assert first.recipe.base_model == final.recipe.base_model == "/pool/base"
    assert [s.model for s in first.recipe.slices[0].sources] == ["/pool/c", "/pool/a", "/pool/base"]
    assert [s.model for s in final.recipe.slices[0].sources] == ["S1", "/pool/b", "/pool/base"]
    assert space.baselines()["uniform"]["S2.all.prev.weight"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "space, models, needles",
    [
        (
            {
                "kind": "method_per_group",
                "methods": ["task_arithmetic", "tis"],
                "search": {"weight": None},
            },
            3,
            ["methods[1]", "did you mean 'ties'"],
        ),
        (
            {"kind": "method_per_group", "methods": ["ties", "ties"], "search": {"weight": None}},
            3,
            ["'ties' is listed twice"],
        ),
        (
            {"kind": "method_per_group", "methods": ["ties"], "search": {"weight": None}},
            3,
            ["methods"],
        ),
        (
            {
                "kind": "method_per_group",
                "methods": ["task_arithmetic", "ties"],
                "search": {"weight": None, "densty": None},
            },
            3,
            ["search.densty: none of the methods"],
        ),
        (
            {
                "kind": "method_per_group",
                "methods": ["task_arithmetic", "slerp"],
                "search": {"weight": None},
            },
            3,
            ["'slerp' declares none of the searched parameters"],
        ),
        (
            {
                "kind": "method_per_group",
                "methods": ["task_arithmetic", "slerp"],
                "search": {"weight": None, "t": None},
            },
            3,
            ["slerp", "at most 1 model"],
        ),
        (
            {
                "kind": "method_per_group",
                "methods": ["task_arithmetic", "karcher"],
                "search": {"weight": None, "max_iter": [2, 9]},
            },
            3,
            ["as method 'karcher'", "only float parameters"],
        ),
        (
            {
                "kind": "method_per_group",
                "methods": ["task_arithmetic", "ties"],
                "search": {"weight": None},
                "fixed": {"density": 2.0},
            },
            3,
            ["as method 'task_arithmetic'", "fixed.density", "must lie in [0, 1]"],
        ),
        (
            {"kind": "pairwise", "method": "slerp", "search": {"t": None}},
            2,
            ["at least three models"],
        ),
        ({"kind": "pairwise", "method": "slerp", "search": {"t": None}}, 7, ["at most 6 models"]),
        (
            {
                "kind": "method_per_group",
                "methods": ["task_arithmetic", "regmean"],
                "search": {"weight": None},
            },
            3,
            ["regmean reads each model's input statistics", "not for a method_per_group space"],
        ),
        (
            {"kind": "pairwise", "method": "regmean", "search": {"weight": None}},
            3,
            ["regmean reads each model's input statistics", "not for a pairwise space"],
        ),
        (
            {"kind": "pairwise", "method": "slerp", "search": {"weight": None}},
            3,
            ["search.weight", "'slerp' has no parameter 'weight'"],
        ),
    ],
)
def test_a_bad_staged_space_is_one_sentence(space, models, needles):
    with pytest.raises(UserError) as info:
        staged_space(space, "/pool/base", {f"m{i}": f"/pool/m{i}" for i in range(models)}, 4)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


# --- mergekit 0.1.5 --------------------------------------------------------------------------
@pytest.mark.mergekit
def test_the_exported_stages_equal_mergekit_multi_stage_by_stage(tmp_path, mergekit_python):
    """Both bundled staged spaces, methods mixed, over a tiny fp32 pool: mergekit-multi runs the
    recipe.yaml evomerge writes, and every stage and the final model are equal."""
    from helpers.mergekit_env import run_driver
    from helpers.tiny_models import build_tiny_pool

    torch.set_num_threads(1)
    pool = build_tiny_pool(tmp_path / "pool", dtype=torch.float32, seed=7)
    models = {n: str(p) for n, p in pool.items() if n != "base"}
    jobs, ours = [], {}
    for name in sorted(KINDS):
        space = staged_space(name, pool["base"], models, 4)
        evo, evo_stages = tmp_path / "evo" / name, tmp_path / "evo-stages" / name
        run_stages(
            space.decode(genomes(space, seed=3)[0]), evo, seed=0, intermediate_dir=evo_stages
        )
        mk, mk_stages = tmp_path / "mk" / name, tmp_path / "mk-stages" / name
        jobs.append(
            {
                "name": name,
                "recipe": (evo / "recipe.yaml").read_text(),
                "out": str(mk),
                "intermediate_dir": str(mk_stages),
                "seed": 0,
            }
        )
        ours[name] = (evo, evo_stages, mk, mk_stages)
    results = run_driver(mergekit_python, {"threads": 1, "multi": jobs})
    for name, (evo, evo_stages, mk, mk_stages) in ours.items():
        assert results[name]["ok"], results[name].get("traceback")
        stage_names = sorted(p.name for p in evo_stages.iterdir())
        assert stage_names == sorted(p.name for p in mk_stages.iterdir())
        assert len(stage_names) == (
            2 if name == "method_per_group" else 1
        )  # by_task_arithmetic, by_ties; S1
        for ours_dir, theirs_dir in [(evo_stages / s, mk_stages / s) for s in stage_names] + [
            (evo, mk)
        ]:
            a, b = (
                load_file(str(ours_dir / "model.safetensors")),
                load_file(str(theirs_dir / "model.safetensors")),
            )
            assert a.keys() == b.keys()
            for key in a:
                # TIES trims by magnitude: exactly equal |delta| could be ordered differently
                # (tests/test_mergekit_golden.py); these fp32 deltas have none
                assert torch.equal(a[key], b[key]), (name, ours_dir.name, key)


# --- the search --------------------------------------------------------------------------------
def _config(tmp_path: Path, pool: Path, space: str, **search) -> Path:
    from helpers.pool_fixtures import pool_search_config

    config = pool_search_config(
        pool,
        space=space,
        tasks=["evomerge_add", "evomerge_rev", "evomerge_sort"],
        subset=8,
        batch_size=32,
        search={"sampler": "tpe", "seed": 3, **search},
    )
    path = tmp_path / f"config-{space}-{search.get('sampler', 'tpe')}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _evomerge(*args: str) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "evomerge", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_a_categorical_search_resumes_and_exports_what_it_scored(tmp_path, small_pool):
    """method_per_group: 7 trials (its 5 baselines first), then resume for 3 in a new process;
    every trial has a method per group; the export of the last trial is its scored model."""
    import optuna

    from evomerge.results.export import export_trial
    from evomerge.search.config import load_run_config
    from evomerge.search.loop import Search

    run_dir = tmp_path / "run"
    config_path = _config(tmp_path, small_pool, "method_per_group", trials=7)
    for args in (
        ("search", str(config_path), "--run-dir", str(run_dir)),
        ("resume", str(run_dir), "--trials", "3"),
    ):
        result = _evomerge(*args)
        assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="evomerge", storage=f"sqlite:///{run_dir / 'study.db'}")
    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 10
    assert [t.user_attrs.get("baseline") for t in trials[:5]] == [
        "uniform",
        "only_add",
        "only_rev",
        "only_sort",
        "ties_uniform",
    ]
    for trial in trials:
        methods = [value for gene, value in trial.params.items() if gene.endswith(".method")]
        assert methods and set(methods) <= {"task_arithmetic", "ties"}

    torch.set_num_threads(1)
    search = Search(load_run_config(run_dir / "config.yaml"), run_dir, create=False)
    trial = trials[-1]
    search.candidate.apply(trial.params)
    export_trial(run_dir, tmp_path / "export", trial_number=trial.number)
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert all(torch.equal(exported[k], t) for k, t in search.candidate.targets.items())
    assert "evomerge_add" in (tmp_path / "export" / "README.md").read_text()


@pytest.mark.parametrize("sampler", ["cmaes", "cmaes_warm"])
def test_cmaes_is_refused_for_categorical_genes(tmp_path, small_pool, sampler):
    run_dir = tmp_path / "run"
    result = _evomerge(
        "search",
        str(_config(tmp_path, small_pool, "pairwise_sequence", sampler=sampler, trials=3)),
        "--run-dir",
        str(run_dir),
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        "categorical gene 'order'" in result.stderr
        and "use sampler gp, tpe or random" in result.stderr
    )
    assert not run_dir.exists()


@pytest.mark.parametrize("name", sorted(KINDS))
def test_the_report_draws_a_staged_genome(tmp_path, name):
    """genome.png: the float genes as a heat map (a pairwise stage's genes on rows of their
    own), each group's method under its label, the order in the title."""
    import json
    from types import SimpleNamespace

    from evomerge.results.report import plot_genome
    from evomerge.search.run_folder import RunGenes

    space = staged_space(name, "/pool/base", {m: f"/pool/{m}" for m in ("a", "b", "c")}, 4)
    genes = RunGenes(
        **json.loads(json.dumps(RunGenes.of(space).to_json()))
    )  # as run.json keeps them
    trial = SimpleNamespace(number=3, params=genomes(space, seed=1)[0], user_attrs={"fitness": 0.5})
    assert plot_genome(genes, trial, tmp_path / "genome.png").stat().st_size > 0
