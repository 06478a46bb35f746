"""Data-flow candidates: what is scored is what `evomerge merge` and mergekit 0.1.5 build from the
exported passthrough recipe, bit for bit, and a trial copies no weights."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from helpers.tiny_models import build_tiny_pool
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evomerge.errors import UserError
from evomerge.merging.executor import run_merge
from evomerge.spaces.dataflow import DataflowCandidate, DataflowConfig, DataflowSpace, Step


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return build_tiny_pool(tmp_path_factory.mktemp("dfs"), n_models=2)


def make_space(pool, **settings) -> DataflowSpace:
    config = DataflowConfig(kind="dataflow", **settings)
    return DataflowSpace(
        config,
        base=str(pool["base"]),
        models={"ft0": str(pool["ft0"]), "ft1": str(pool["ft1"])},
        dtype="float32",
    )


@pytest.fixture(scope="module")
def live(pool):
    space = make_space(pool, repeats=2, scale=(0.5, 1.5))
    model = AutoModelForCausalLM.from_pretrained(pool["base"], dtype=torch.float32).eval()
    return space, model, DataflowCandidate(model, space, dtype=torch.float32)


def random_genomes(space, count, seed=0):
    rng = random.Random(seed)
    return [{g.name: rng.uniform(g.low, g.high) for g in space.genes} for _ in range(count)]


BATCH = torch.randint(1, 60, (3, 12), generator=torch.Generator().manual_seed(0))


def test_the_scored_candidate_is_the_exported_model(live, tmp_path):
    space, model, candidate = live
    for index, genome in enumerate(random_genomes(space, 6)):
        candidate.apply(genome)
        with torch.no_grad():
            scored = model(BATCH).logits
            generated = model.generate(BATCH[:1], max_new_tokens=6, do_sample=False)
        out = tmp_path / str(index)
        run_merge(space.recipe(genome), out)
        exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert exported.config.num_hidden_layers == len(space.path(genome))
        with torch.no_grad():
            assert torch.equal(exported(BATCH).logits, scored)
            assert torch.equal(
                exported.generate(BATCH[:1], max_new_tokens=6, do_sample=False), generated
            )


def test_a_layer_used_twice_keeps_two_cache_slots(live, tmp_path):
    space, model, candidate = live
    path = [Step("ft0", 0), Step("ft0", 1), Step("ft0", 0), Step("ft1", 3, 0.7)]
    candidate.assemble(path)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    with torch.no_grad():
        cached = model.generate(BATCH[:1], max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(BATCH[:1], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_a_trial_copies_no_weights_but_the_scaled_projections(live):
    space, model, candidate = live
    path = [Step("base", 0), Step("ft0", 1, 0.8), Step("ft0", 2), Step("ft1", 2)]
    candidate.assemble(path)
    resident = {p.data_ptr() for source in candidate.sources.values() for p in source.parameters()}
    fresh = [name for name, p in model.named_parameters() if p.data_ptr() not in resident]
    assert sorted(fresh) == [
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
    ]
    source = candidate.sources["ft0"].model.layers[1]
    assert torch.equal(
        model.model.layers[1].mlp.down_proj.weight, source.mlp.down_proj.weight * 0.8
    )


def test_baselines_are_the_models_themselves(pool, live, tmp_path):
    space, model, candidate = live
    baselines = space.baselines()
    assert set(baselines) == {"base_path", "only_ft0", "only_ft1"}
    candidate.apply(baselines["only_ft1"])
    specialist = AutoModelForCausalLM.from_pretrained(pool["ft1"], dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(model(BATCH).logits, specialist(BATCH).logits)
    run_merge(space.recipe(baselines["only_ft1"]), tmp_path / "out")
    ours, theirs = (
        load_file(str(tmp_path / "out" / "model.safetensors")),
        load_file(str(pool["ft1"] / "model.safetensors")),
    )
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_paths_are_bounded_and_runs_become_slices(pool):
    space = make_space(pool, repeats=2, max_layers=3)
    everything = {g.name: 1.0 for g in space.genes}
    assert len(space.path(everything)) == 3
    recipe = space.recipe({g.name: float(g.model == "ft0") for g in space.genes})
    assert [s.sources[0].layer_range for s in recipe.slices] == [(0, 3)]  # 3 = max_layers
    assert space.path({g.name: 0.0 for g in space.genes}) == [Step("base", 0)]


@pytest.mark.mergekit
def test_mergekit_merges_the_exported_recipe_to_the_same_tensors(live, mergekit_python, tmp_path):
    from helpers.mergekit_env import run_driver

    space, _, _ = live
    genomes = random_genomes(space, 3, seed=1)
    jobs = {
        "threads": 1,
        "merges": [
            {
                "name": str(i),
                "recipe": space.recipe(g).to_yaml(),
                "out": str(tmp_path / f"mk{i}"),
                "seed": 0,
            }
            for i, g in enumerate(genomes)
        ],
    }
    results = run_driver(mergekit_python, jobs)
    for i, genome in enumerate(genomes):
        assert results[str(i)]["ok"], results[str(i)].get("traceback")
        run_merge(space.recipe(genome), tmp_path / f"em{i}")
        ours = load_file(str(tmp_path / f"em{i}" / "model.safetensors"))
        theirs = {}
        for file in (tmp_path / f"mk{i}").glob("*.safetensors"):
            theirs.update(load_file(str(file)))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_bad_data_flow_spaces_are_refused(pool, tmp_path):
    with pytest.raises(UserError, match="exceeds the bound repeats x base depth"):
        make_space(pool, repeats=2, max_layers=9)
    with pytest.raises(UserError, match="not in the pool"):
        make_space(pool, sources=["base", "ft9"])
    wide = build_tiny_pool(tmp_path / "wide", n_models=0, intermediate_size=64)["base"]
    with pytest.raises(UserError, match="do not fit the base"):
        DataflowSpace(
            DataflowConfig(kind="dataflow"),
            base=str(pool["base"]),
            models={"wide": str(wide)},
            dtype=None,
        )
    other = tmp_path / "mistral"
    shutil.copytree(pool["ft0"], other)
    config = (
        (other / "config.json")
        .read_text()
        .replace('"llama"', '"mistral"')
        .replace("LlamaForCausalLM", "MistralForCausalLM")
    )
    (other / "config.json").write_text(config)
    with pytest.raises(UserError, match="different architectures"):
        DataflowSpace(
            DataflowConfig(kind="dataflow"),
            base=str(pool["base"]),
            models={"m": str(other)},
            dtype=None,
        )


def test_a_data_flow_search_exports_the_model_it_scored(tmp_path, small_pool):
    from helpers.pool_fixtures import pool_search_config

    from evomerge.cli.process import set_up_process
    from evomerge.results.export import export_trial
    from evomerge.search.config import RunConfig
    from evomerge.search.loop import Search
    from evomerge.search.run_folder import write_run_folder

    data = pool_search_config(
        small_pool,
        tasks=["evomerge_add", "evomerge_sort"],
        subset=10,
        search={"sampler": "random", "trials": 6, "seed": 3},
        space="dataflow_scaled",
    )
    config, run_dir = RunConfig.model_validate(data), tmp_path / "run"
    set_up_process(threads=1, hf_home=run_dir / "hf", offline=True)
    write_run_folder(config, run_dir)
    search = Search(config, run_dir)
    search.run(until=6, progress=False)
    trials = [
        t
        for t in search.study.trials
        if t.state.name == "COMPLETE" and "baseline" not in t.user_attrs
    ]
    assert trials, [t.user_attrs.get("fail_reason") for t in search.study.trials]
    trial = trials[-1]
    search.candidate.apply(trial.params)
    model = search.candidate.model  # the live evaluation model
    batch = torch.randint(3, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scored = model(batch).logits
    export_trial(run_dir, tmp_path / "export", trial_number=trial.number)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    assert exported.config.num_hidden_layers == len(search.space.path(trial.params))
    with torch.no_grad():
        assert torch.equal(exported(batch).logits, scored)


def test_the_vllm_backend_refuses_a_data_flow_space(tmp_path, small_pool):
    import subprocess
    import sys

    import yaml
    from helpers.pool_fixtures import pool_search_config

    data = pool_search_config(
        small_pool,
        tasks=["evomerge_add"],
        subset=10,
        search={"trials": 2},
        space="dataflow",
        backend="vllm",
    )
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "evomerge",
            "search",
            str(tmp_path / "config.yaml"),
            "--run-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "fitness.backend: hf" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()
