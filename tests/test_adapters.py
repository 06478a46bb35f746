"""PEFT LoRA adapters as recipe inputs (`model: base+adapter`), against mergekit 0.1.5.

Adapters are written here as PEFT saves them (adapter_config.json + adapter_model.safetensors with
`base_model.model.<module>.lora_A.weight` keys), so mergekit loads them through PEFT itself.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import RANK, build_tiny_pool, write_adapter
from safetensors.torch import load_file, save_file

from evomerge.errors import UserError
from evomerge.io.adapters import AdapterCheckpoint, open_checkpoint
from evomerge.io.checkpoint import Checkpoint
from evomerge.merging.executor import run_merge
from evomerge.merging.recipe import parse_recipe


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def lora_pool(request, tmp_path_factory):
    dtype = torch.float32 if request.param == "fp32" else torch.bfloat16
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    folders = build_tiny_pool(root, dtype=dtype, n_models=1)
    folders["plain"] = write_adapter(root / "plain", folders["base"])
    folders["rslora"] = write_adapter(
        root / "rslora",
        folders["base"],
        dtype=dtype,
        seed=1,
        use_rslora=True,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"q_proj": 16},
    )
    return request.param, folders


def test_a_lora_recipe_matches_mergekit(lora_pool, mergekit_python, tmp_path):
    from helpers.mergekit_env import run_driver

    pool_name, folders = lora_pool
    dtype = "float32" if pool_name == "fp32" else "bfloat16"
    recipes = {
        "single": f"merge_method: linear\ndtype: {dtype}\nmodels:\n"
        f"  - model: {folders['base']}+{folders['plain']}\n    parameters: {{weight: 1.0}}\n",
        "two_adapters": "merge_method: task_arithmetic\n"
        f"base_model: {folders['base']}\ndtype: {dtype}\nmodels:\n"
        f"  - model: {folders['base']}+{folders['plain']}\n    parameters: {{weight: 0.7}}\n"
        f"  - model: {folders['base']}+{folders['rslora']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {folders['ft0']}\n    parameters: {{weight: 0.3}}\n",
    }
    jobs = {
        "threads": 1,
        "merges": [
            {
                "name": name,
                "recipe": text,
                "out": str(tmp_path / f"mk-{name}"),
                "seed": 0,
                "lora_cache": str(tmp_path / "cache"),
            }
            for name, text in recipes.items()
        ],
    }
    results = run_driver(mergekit_python, jobs)
    for name, text in recipes.items():
        assert results[name]["ok"], results[name].get("traceback")
        run_merge(parse_recipe(text), tmp_path / f"em-{name}")
        ours = load_file(str(tmp_path / f"em-{name}" / "model.safetensors"))
        theirs = {}
        for file in sorted((tmp_path / f"mk-{name}").glob("*.safetensors")):
            theirs.update(load_file(str(file)))
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].dtype == theirs[key].dtype, key
            assert torch.equal(ours[key], theirs[key]), f"{name}: {key} differs"


def test_the_adapter_changes_exactly_the_tensors_it_targets(lora_pool):
    _, folders = lora_pool
    base = Checkpoint(str(folders["base"]))
    adapted = open_checkpoint(f"{folders['base']}+{folders['plain']}")
    assert isinstance(adapted, AdapterCheckpoint)
    changed = {
        name for name in base.names if not torch.equal(base.tensor(name), adapted.tensor(name))
    }
    assert changed == set(adapted.factors)
    assert any("embed_tokens" in n for n in changed) and any("down_proj" in n for n in changed)
    name = next(n for n in changed if n.endswith("q_proj.weight"))
    factors = adapted.factors[name]
    expected = (base.tensor(name).float() + (factors.b @ factors.a) * 2.0).to(
        base.torch_dtype(name)
    )
    assert torch.equal(adapted.tensor(name), expected)  # alpha 8 / r 4


def test_a_folder_with_a_plus_in_its_name_is_a_plain_model(tmp_path):
    folders = build_tiny_pool(tmp_path / "a+b", n_models=0)
    assert type(open_checkpoint(str(folders["base"]))) is Checkpoint


def _merge_cli(recipe: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    recipe_file = out.parent / "recipe.yaml"
    recipe_file.write_text(recipe)
    return subprocess.run(
        [sys.executable, "-m", "evomerge", "merge", str(recipe_file), str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _bad(tmp_path, make_adapter) -> str:
    folders = build_tiny_pool(tmp_path / "pool", n_models=1)
    adapter = make_adapter(tmp_path / "adapter", folders)
    recipe = (
        "merge_method: linear\nmodels:\n"
        f"  - model: {folders['base']}+{adapter}\n    parameters: {{weight: 1.0}}\n"
    )
    out = tmp_path / "out"
    result = _merge_cli(recipe, out)
    assert result.returncode == 2, result.stderr
    assert not out.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    return lines[0]


def test_bad_adapters_are_refused_with_one_sentence(tmp_path):
    def not_an_adapter(folder, folders):
        folder.mkdir()
        return folder

    def pickle_only(folder, folders):
        write_adapter(folder, folders["base"])
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        torch.save(tensors, folder / "adapter_model.bin")
        (folder / "adapter_model.safetensors").unlink()
        return folder

    def other_base(folder, folders):
        return write_adapter(folder, folders["base"], base_model_name_or_path=str(folders["ft0"]))

    def missing_module(folder, folders):
        write_adapter(folder, folders["base"])
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        tensors["base_model.model.model.layers.0.mlp.nope.lora_A.weight"] = torch.zeros(RANK, 32)
        tensors["base_model.model.model.layers.0.mlp.nope.lora_B.weight"] = torch.zeros(32, RANK)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        return folder

    def wrong_shape(folder, folders):
        write_adapter(folder, folders["base"])
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        key = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
        tensors[key] = torch.zeros(7, RANK)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        return folder

    def dora(folder, folders):
        return write_adapter(folder, folders["base"], use_dora=True)

    expected = {
        not_an_adapter: "no adapter_config.json",
        pickle_only: "--allow-pickle",
        other_base: "was trained on",
        missing_module: "which the base model lacks",
        wrong_shape: "does not fit the base",
        dora: "DoRA",
    }
    for index, (make, words) in enumerate(expected.items()):
        assert words in _bad(tmp_path / str(index), make)


def test_a_pickle_adapter_loads_weights_only_when_allowed(tmp_path):
    folders = build_tiny_pool(tmp_path / "pool", n_models=0)
    adapter = write_adapter(tmp_path / "adapter", folders["base"])
    reference = open_checkpoint(f"{folders['base']}+{adapter}")
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    torch.save(tensors, adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="--allow-pickle"):
        open_checkpoint(f"{folders['base']}+{adapter}")
    pickled = open_checkpoint(f"{folders['base']}+{adapter}", allow_pickle=True)
    for name in reference.factors:
        assert torch.equal(pickled.tensor(name), reference.tensor(name))


def test_a_search_over_a_pool_with_an_adapter_exports_what_it_scored(tmp_path, small_pool):
    """A pool member may be `base+adapter`: the search merges it like any model, and the
    exported model is the scored one, bit for bit."""
    from helpers.pool_fixtures import pool_search_config

    from evomerge.cli.process import set_up_process
    from evomerge.results.export import export_trial
    from evomerge.search.config import RunConfig
    from evomerge.search.loop import Search
    from evomerge.search.run_folder import write_run_folder

    adapter = write_adapter(tmp_path / "adapter", small_pool / "base")
    data = pool_search_config(
        small_pool,
        tasks=["evomerge_add"],
        subset=8,
        space="task_arithmetic_layers",
        search={"sampler": "random", "trials": 5, "seed": 0},
    )
    data["pool"]["models"] = {
        "add": str(small_pool / "add"),
        "lora": f"{small_pool / 'base'}+{adapter}",
    }
    config, run_dir = RunConfig.model_validate(data), tmp_path / "run"
    set_up_process(threads=1, hf_home=run_dir / "hf", offline=True)
    write_run_folder(config, run_dir)
    search = Search(config, run_dir)
    search.run(until=5, progress=False)
    trial = [t for t in search.study.trials if t.state.name == "COMPLETE"][-1]
    search.candidate.apply(trial.params)
    scored = {name: t.detach().clone() for name, t in search.candidate.targets.items()}
    export_trial(run_dir, tmp_path / "export", trial_number=trial.number)
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert all(torch.equal(exported[k], scored[k]) for k in scored)
    assert any(
        "+" in line for line in (tmp_path / "export" / "recipe.yaml").read_text().splitlines()
    )


# --- adapter configs and files, validated like model files (issue 30) -----------------------
def _config(**changes):
    def edit(folder: Path) -> None:
        import json

        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))

    return edit


def _truncate(folder: Path) -> None:
    file = folder / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _not_a_pickle(folder: Path) -> None:
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"not a pickle file at all")


BROKEN_ADAPTERS = {  # case -> (what is done to a good adapter, words of the message)
    "rank-0": (_config(r=0), ("r must be a positive number", "0")),
    "alpha-not-a-number": (_config(lora_alpha="x"), ("lora_alpha", "'x'")),
    "rank-pattern-not-a-mapping": (_config(rank_pattern=[4]), ("rank_pattern",)),
    "config-is-a-list": (
        lambda f: (f / "adapter_config.json").write_text("[1]"),
        ("adapter_config.json", "JSON list"),
    ),
    "config-not-utf8": (
        lambda f: (f / "adapter_config.json").write_bytes(b'{"r": "\xe9"}'),
        ("not UTF-8",),
    ),
    "truncated-weights": (_truncate, ("adapter_model.safetensors",)),
    "rank-differs-from-the-factors": (_config(r=RANK * 2), (f"rank {RANK} factors", "r=8")),
    "pickle-that-is-not-one": (_not_a_pickle, ("adapter_model.bin", "convert it")),
}


@pytest.fixture(scope="module")
def adapter_base(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return build_tiny_pool(tmp_path_factory.mktemp("adapter-base"), n_models=0)["base"]


@pytest.mark.parametrize("case", sorted(BROKEN_ADAPTERS))
def test_a_broken_adapter_is_one_sentence(tmp_path, adapter_base, monkeypatch, capsys, case):
    """Each once ended in a traceback (ZeroDivisionError, TypeError, AttributeError,
    SafetensorError, torch's own advice to retry with weights_only=False) or, for a rank that
    differs from the factors' (which PEFT refuses), merged without a word."""
    from evomerge.cli import main

    break_it, needles = BROKEN_ADAPTERS[case]
    adapter = write_adapter(tmp_path / "adapter", adapter_base)
    break_it(adapter)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {adapter_base}+{adapter}\n"
        "    parameters: {weight: 1.0}\n"
    )
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["evomerge", "merge", str(recipe), str(out), "--allow-pickle"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(n in lines[0] for n in needles), err
    assert "weights_only" not in err and not out.exists()
