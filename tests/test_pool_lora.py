"""The offline LoRA pool (`evomerge pool demo-lora`): PEFT-format adapters that PEFT, mergekit
0.1.5 and evomerge read alike, real specialists, and a search over them."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge import pool
from evomerge.errors import UserError
from evomerge.io.adapters import AdapterCheckpoint
from evomerge.io.checkpoint import Checkpoint
from evomerge.pool.lora import TARGET_MODULES, build_lora_pool

SKILLS = tuple(pool.POOLS["demo"])


def test_layout_and_manifest(small_lora_pool: Path) -> None:
    manifest = pool.load_manifest(small_lora_pool)
    assert manifest["name"] == "demo-lora" and manifest["tasks"] == [
        pool.TASK_PREFIX + s for s in SKILLS
    ]
    base = small_lora_pool / "base"
    for skill in SKILLS:
        assert (
            manifest["models"][skill] == f"{base.resolve()}+{(small_lora_pool / skill).resolve()}"
        )
        config = json.loads((small_lora_pool / skill / "adapter_config.json").read_text())
        assert (
            config["peft_type"] == "LORA"
            and Path(config["base_model_name_or_path"]) == base.resolve()
        )
        names = load_file(str(small_lora_pool / skill / "adapter_model.safetensors"))
        modules = {key.split(".")[-3] for key in names}
        assert modules == set(TARGET_MODULES) and all(
            key.startswith("base_model.model.model.layers.") for key in names
        )


def test_peft_reads_the_adapters_as_evomerge_does(small_lora_pool: Path) -> None:
    """PEFT's own loader and merge_and_unload give every tensor evomerge's adapter path gives."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for skill in SKILLS:
        base = AutoModelForCausalLM.from_pretrained(small_lora_pool / "base", use_safetensors=True)
        merged = (
            PeftModel.from_pretrained(base, small_lora_pool / skill).merge_and_unload().state_dict()
        )
        ours = AdapterCheckpoint(str(small_lora_pool / "base"), str(small_lora_pool / skill))
        assert len(ours.factors) == 7 * Checkpoint(small_lora_pool / "base").num_layers
        assert all(torch.equal(ours.tensor(name), merged[name]) for name in ours.names), skill


def test_the_base_is_the_demo_pools_base(small_lora_pool: Path, small_pool: Path) -> None:
    ours, theirs = (
        load_file(str(p / "base" / "model.safetensors")) for p in (small_lora_pool, small_pool)
    )
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_adapters_are_specialists(small_lora_pool: Path, tmp_path: Path) -> None:
    """Each adapter, merged into the base, beats the base on its own skill."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.fitness import Evaluator, FitnessConfig

    manifest = pool.load_manifest(small_lora_pool)
    base = AutoModelForCausalLM.from_pretrained(
        small_lora_pool / "base", use_safetensors=True
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(small_lora_pool / "base")
    live = copy.deepcopy(base)
    config = FitnessConfig(tasks=manifest["tasks"], task_paths=[manifest["task_path"]])
    evaluator = Evaluator(live, tokenizer, config, tmp_path / "run")
    scores = {"base": evaluator.score(full=True).metrics}
    state = dict(live.named_parameters())
    for skill in SKILLS:
        adapted = AdapterCheckpoint(str(small_lora_pool / "base"), str(small_lora_pool / skill))
        with torch.no_grad():
            for name, parameter in state.items():
                parameter.copy_(adapted.tensor(name))
        scores[skill] = evaluator.score(full=True).metrics
    for skill in SKILLS:
        task = pool.TASK_PREFIX + skill
        assert scores[skill][task]["acc,none"] >= scores["base"][task]["acc,none"] + 0.05, (
            skill,
            scores,
        )


def test_a_lora_pool_recipe_matches_mergekit(
    small_lora_pool: Path, mergekit_python, tmp_path: Path
) -> None:
    """`base+adapter` references to the built adapters: evomerge merge == mergekit 0.1.5."""
    from helpers.mergekit_env import run_driver

    from evomerge.merging.executor import run_merge
    from evomerge.merging.recipe import parse_recipe

    models = pool.load_manifest(small_lora_pool)["models"]
    recipe = (
        f"merge_method: task_arithmetic\nbase_model: {models['base']}\ndtype: float32\nmodels:\n"
        + "".join(
            f"  - model: {models[s]}\n    parameters: {{weight: {w}}}\n"
            for s, w in zip(SKILLS, (0.9, 0.6, 0.4))
        )
    )
    jobs = {
        "threads": 1,
        "merges": [
            {
                "name": "lora",
                "recipe": recipe,
                "out": str(tmp_path / "mk"),
                "seed": 0,
                "lora_cache": str(tmp_path / "cache"),
            }
        ],
    }
    result = run_driver(mergekit_python, jobs)["lora"]
    assert result["ok"], result.get("traceback")
    run_merge(parse_recipe(recipe), tmp_path / "em")
    ours = load_file(str(tmp_path / "em" / "model.safetensors"))
    theirs = {}
    for file in sorted((tmp_path / "mk").glob("*.safetensors")):
        theirs.update(load_file(str(file)))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_a_search_over_the_lora_pool(small_lora_pool: Path, tmp_path: Path) -> None:
    """A short search whose pool is the adapters: they stay factored, every trial is scored,
    and the export is the scored model."""
    from helpers.pool_fixtures import pool_search_config

    from evomerge.cli.process import set_up_process
    from evomerge.merging.factored import FactoredTensor
    from evomerge.results.export import export_trial
    from evomerge.search.config import RunConfig
    from evomerge.search.loop import Search
    from evomerge.search.run_folder import write_run_folder

    models = pool.load_manifest(small_lora_pool)["models"]
    data = pool_search_config(
        small_lora_pool,
        tasks=["evomerge_add", "evomerge_rev"],
        subset=8,
        space="dare_ties_layers",
        search={"sampler": "random", "trials": 4, "seed": 0},
    )
    data["pool"]["models"] = {s: models[s] for s in SKILLS}
    config, run_dir = RunConfig.model_validate(data), tmp_path / "run"
    set_up_process(threads=1, hf_home=run_dir / "hf", offline=True)
    write_run_folder(config, run_dir)
    search = Search(config, run_dir)
    search.run(until=4, progress=False)
    assert any(isinstance(job.tensor, FactoredTensor) for job in search.candidate.jobs)
    done = [t for t in search.study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 4
    best = max(done, key=lambda t: t.value)
    search.candidate.apply(best.params)
    scored = {name: t.detach().clone() for name, t in search.candidate.targets.items()}
    export_trial(run_dir, tmp_path / "export", trial_number=best.number)
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert all(torch.equal(exported[k], scored[k]) for k in scored)


def test_build_is_deterministic(small_lora_pool: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    build_lora_pool(again, size="small")
    files = ["base/model.safetensors", *(f"{s}/adapter_model.safetensors" for s in SKILLS)]
    for file in files:
        assert (again / file).read_bytes() == (small_lora_pool / file).read_bytes(), file


def test_bad_builds_are_refused(small_lora_pool: Path) -> None:
    with pytest.raises(UserError, match="--force"):
        build_lora_pool(small_lora_pool, size="small")
    with pytest.raises(UserError, match="unknown pool size"):
        build_lora_pool(small_lora_pool.parent / "x", size="huge")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from evomerge.cli import main; main()",
            "pool",
            "demo-lora",
            str(small_lora_pool),
            "--size",
            "small",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        proc.returncode == 2
        and proc.stderr.strip().startswith("error:")
        and "--force" in proc.stderr
    )
    assert "Traceback" not in proc.stderr and not list(small_lora_pool.parent.glob(".*partial*"))
