"""Bad inputs: each one ends in ONE sentence on stderr (`error: ...`), exit code 2, and nothing
written — no output folder, no run folder, no leftover staging folder.

Merge cases run the real CLI entry point (`evomerge.cli.main`) in-process on tiny Llama models;
search cases run `python -m evomerge` in a subprocess on the small demo pool, as users do.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers.pool_fixtures import pool_search_config
from helpers.tiny_models import build_tiny_pool

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# --- helpers ---------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root` with a hash of its content: "was anything written?"."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run `evomerge ARGS` through the real entry point; (exit code, stderr)."""
    from evomerge.cli import main

    monkeypatch.setattr(sys, "argv", ["evomerge", *args])
    capsys.readouterr()  # drop what the test's own set-up printed
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def evomerge(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "evomerge", *args],
        check=False,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_sentence(code: int, err: str, *needles: str, progress_before: bool = False) -> None:
    """Exit code 2 and stderr = exactly one line `error: ...` holding every needle.

    `progress_before`: a search's set-up may log progress (study created, weights loaded,
    datasets prepared) before the error; the error must still be the one and last line of its
    kind. As on a terminal, a progress bar cleared with a carriage return does not count."""
    assert code == 2, err
    lines = [line.rsplit("\r", 1)[-1] for line in err.strip().split("\n")]
    lines = [line for line in lines if line.strip()]
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    if not progress_before:
        assert lines == errors, err
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    return build_tiny_pool(tmp_path_factory.mktemp("tiny"), n_models=2)


@pytest.fixture
def work(tmp_path) -> Path:
    """The folder where each case writes its inputs and expects no output to appear."""
    return tmp_path


def linear_recipe(*models: Path, **parameters) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
        **({"parameters": parameters} if parameters else {}),
    }


def merge_fails(monkeypatch, capsys, work: Path, recipe, *needles: str, extra=()) -> str:
    """`evomerge merge` of `recipe` (a dict or YAML text) must fail cleanly, writing nothing."""
    file = work / "recipe.yaml"
    file.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    before = snapshot(work)
    code, err = cli(monkeypatch, capsys, "merge", str(file), str(work / "out" / "model"), *extra)
    assert_one_sentence(code, err, *needles)
    assert snapshot(work) == before, "something was written"
    return err


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_tensors(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


# --- recipes ---------------------------------------------------------------------------------
def test_malformed_yaml(monkeypatch, capsys, work, pool):
    merge_fails(
        monkeypatch, capsys, work, "merge_method: linear\nmodels: [\n  - {model: a\n", "line"
    )


def test_unknown_key_names_the_closest_valid_key(monkeypatch, capsys, work, pool):
    recipe = linear_recipe(pool["ft0"], pool["ft1"])
    recipe["merge_methd"] = recipe.pop("merge_method")
    merge_fails(monkeypatch, capsys, work, recipe, "merge_methd", "did you mean 'merge_method'")


def test_unknown_merge_method(monkeypatch, capsys, work, pool):
    recipe = {**linear_recipe(pool["ft0"], pool["ft1"]), "merge_method": "linaer"}
    merge_fails(monkeypatch, capsys, work, recipe, "linaer", "did you mean 'linear'")


def test_missing_model_path(monkeypatch, capsys, work, pool):
    recipe = linear_recipe(pool["ft0"], work / "no-such-model")
    merge_fails(monkeypatch, capsys, work, recipe, "no-such-model", "does not exist")


def test_folder_without_safetensors(monkeypatch, capsys, work, pool):
    empty = work / "empty-model"
    empty.mkdir()
    shutil.copy(pool["ft0"] / "config.json", empty)
    merge_fails(monkeypatch, capsys, work, linear_recipe(pool["ft0"], empty), "no .safetensors")


def _pickle_model(src: Path, dst: Path) -> Path:
    from safetensors.torch import load_file

    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    torch.save(load_file(src / "model.safetensors"), dst / "pytorch_model.bin")
    return dst


def test_pickle_weights_are_refused_without_allow_pickle(monkeypatch, capsys, work, pool):
    pickled = _pickle_model(pool["ft1"], work / "pickled")
    merge_fails(
        monkeypatch, capsys, work, linear_recipe(pool["ft0"], pickled), "pickle", "--allow-pickle"
    )


def test_allow_pickle_loads_weights_only_and_merges_the_same(monkeypatch, capsys, work, pool):
    from safetensors.torch import load_file

    pickled = _pickle_model(pool["ft1"], work / "pickled")
    for name, second in (("from-pickle", pickled), ("from-safetensors", pool["ft1"])):
        (work / f"{name}.yaml").write_text(yaml.safe_dump(linear_recipe(pool["ft0"], second)))
        code, err = cli(
            monkeypatch,
            capsys,
            "merge",
            str(work / f"{name}.yaml"),
            str(work / name),
            "--allow-pickle",
        )
        assert code == 0, err
    a, b = (
        load_file(work / "from-pickle" / "model.safetensors"),
        load_file(work / "from-safetensors" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _RunsCode:
    """A pickle payload: unpickling it (without weights_only) would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_allow_pickle_never_runs_pickled_code(monkeypatch, capsys, work, pool):
    evil = work / "evil"
    evil.mkdir()
    shutil.copy(pool["ft1"] / "config.json", evil)
    marker = work / "pwned"
    torch.save(
        {"model.embed_tokens.weight": torch.zeros(2), "x": _RunsCode(marker)},
        evil / "pytorch_model.bin",
    )
    merge_fails(
        monkeypatch,
        capsys,
        work,
        linear_recipe(pool["ft0"], evil),
        "refused",
        extra=("--allow-pickle",),
    )
    assert not marker.exists()


def test_truncated_safetensors(monkeypatch, capsys, work, pool):
    broken = copy_model(pool["ft1"], work / "truncated")
    file = broken / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    merge_fails(monkeypatch, capsys, work, linear_recipe(pool["ft0"], broken), "truncated")


def test_corrupt_safetensors_header(monkeypatch, capsys, work, pool):
    broken = copy_model(pool["ft1"], work / "corrupt")
    data = bytearray((broken / "model.safetensors").read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    data[8 : 8 + header_len] = b"\xff" * header_len  # not JSON
    (broken / "model.safetensors").write_bytes(bytes(data))
    merge_fails(
        monkeypatch,
        capsys,
        work,
        linear_recipe(pool["ft0"], broken),
        "unreadable safetensors header",
    )


def test_header_claiming_an_absurd_size(monkeypatch, capsys, work, pool):
    broken = copy_model(pool["ft1"], work / "absurd")
    (broken / "model.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}" + b"\0" * 64)
    merge_fails(monkeypatch, capsys, work, linear_recipe(pool["ft0"], broken), "claims", "header")


# --- the pool ---------------------------------------------------------------------------------
def test_shapes_that_differ_between_models(monkeypatch, capsys, work, pool):
    wider = build_tiny_pool(work / "wider", n_models=0, intermediate_size=64)["base"]
    merge_fails(
        monkeypatch, capsys, work, linear_recipe(pool["ft0"], wider), "different shapes", "mlp"
    )


def test_different_architectures_by_config(monkeypatch, capsys, work, pool):
    other = copy_model(pool["ft1"], work / "mistral")
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (other / "config.json").write_text(json.dumps(config))
    merge_fails(
        monkeypatch,
        capsys,
        work,
        linear_recipe(pool["ft0"], other),
        "different architectures",
        "mistral",
    )


def test_different_architectures_by_tensor_names(monkeypatch, capsys, work, pool):
    other = copy_model(pool["ft1"], work / "with-bias")
    rewrite_tensors(
        other, lambda t: t.update({"model.layers.2.self_attn.q_proj.bias": torch.zeros(32)})
    )
    merge_fails(
        monkeypatch,
        capsys,
        work,
        linear_recipe(pool["ft0"], other),
        "different architectures",
        "model.layers.N.self_attn.q_proj.bias",
    )


def test_different_vocabularies(monkeypatch, capsys, work, pool):
    """Policy: models must share one vocabulary (config vocab_size); the message names both."""
    bigger = build_tiny_pool(work / "vocab", n_models=0, vocab_size=80)["base"]
    merge_fails(
        monkeypatch,
        capsys,
        work,
        linear_recipe(pool["ft0"], bigger),
        "vocabularies",
        "64 tokens",
        "80 tokens",
    )


def test_nan_in_a_source_is_refused_with_the_tensor_name(monkeypatch, capsys, work, pool):
    broken = copy_model(pool["ft1"], work / "nan")
    rewrite_tensors(
        broken, lambda t: t["model.layers.1.mlp.up_proj.weight"].__setitem__((0, 0), float("nan"))
    )
    merge_fails(
        monkeypatch,
        capsys,
        work,
        linear_recipe(pool["ft0"], broken),
        "NaN",
        "model.layers.1.mlp.up_proj.weight",
    )


def test_inf_in_a_source_is_refused(monkeypatch, capsys, work, pool):
    broken = copy_model(pool["ft1"], work / "inf")
    rewrite_tensors(broken, lambda t: t["model.norm.weight"].__setitem__(3, float("inf")))
    merge_fails(
        monkeypatch, capsys, work, linear_recipe(pool["ft0"], broken), "Inf", "model.norm.weight"
    )


# --- parameters -------------------------------------------------------------------------------
def test_density_above_one(monkeypatch, capsys, work, pool):
    recipe = {
        "merge_method": "ties",
        "base_model": str(pool["base"]),
        "models": [
            {"model": str(pool[m]), "parameters": {"weight": 0.5, "density": 1.5}}
            for m in ("ft0", "ft1")
        ],
    }
    merge_fails(monkeypatch, capsys, work, recipe, "'density'", "[0, 1]", "1.5")


def test_negative_t_for_slerp(monkeypatch, capsys, work, pool):
    recipe = {
        "merge_method": "slerp",
        "base_model": str(pool["base"]),
        "models": [{"model": str(pool["ft0"])}],
        "parameters": {"t": -0.5},
    }
    merge_fails(monkeypatch, capsys, work, recipe, "'t'", "-0.5")


def test_nan_parameter(monkeypatch, capsys, work, pool):
    recipe = linear_recipe(pool["ft0"], pool["ft1"])
    recipe["models"][0]["parameters"]["weight"] = ".nan"
    merge_fails(monkeypatch, capsys, work, recipe, "'weight'", "finite")


def test_negative_task_arithmetic_weights_stay_allowed(monkeypatch, capsys, work, pool):
    """mergekit allows negative weights (task negation); only what is invalid is refused."""
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(pool["base"]),
        "models": [{"model": str(pool["ft0"]), "parameters": {"weight": -0.5}}],
    }
    (work / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, err = cli(monkeypatch, capsys, "merge", str(work / "r.yaml"), str(work / "out"))
    assert code == 0, err


def test_weights_summing_to_zero_with_normalize(monkeypatch, capsys, work, pool):
    recipe = linear_recipe(pool["ft0"], pool["ft1"])
    recipe["models"][1]["parameters"]["weight"] = -1.0
    merge_fails(monkeypatch, capsys, work, recipe, "sum to 0", "normalize")


def ties_recipe(pool, *, global_=None, first=None, slice_=None) -> dict:
    """A TIES recipe over ft0 and ft1, as slices when `slice_` parameters are given."""
    first = {"weight": 0.5, **(first or {})}
    if slice_ is None:
        models = [
            {"model": str(pool["ft0"]), "parameters": first},
            {"model": str(pool["ft1"]), "parameters": {"weight": 0.5}},
        ]
        body = {"models": models}
    else:
        sources = [
            {"model": str(pool["ft0"]), "layer_range": [0, 4], "parameters": first},
            {"model": str(pool["ft1"]), "layer_range": [0, 4], "parameters": {"weight": 0.5}},
            {"model": str(pool["base"]), "layer_range": [0, 4]},
        ]
        body = {"slices": [{"sources": sources, "parameters": slice_}]}
    return {
        "merge_method": "ties",
        "base_model": str(pool["base"]),
        **body,
        **({"parameters": global_} if global_ else {}),
    }


MISSPELLED = {  # level -> (recipe changes, path named in the message, closest name)
    "global": ({"global_": {"lamda": 3}}, "parameters.lamda", "lambda"),
    "per-model": ({"first": {"densty": 0.2}}, "models[0].parameters.densty", "density"),
    "per-slice": ({"slice_": {"densty": 0.2}}, "slices[0].parameters.densty", "density"),
    "per-source": (
        {"slice_": {}, "first": {"densty": 0.2}},
        "slices[0].sources[0].parameters.densty",
        "density",
    ),
    "filter-list": (
        {"first": {"densty": [{"filter": "mlp", "value": 0.2}, {"value": 1.0}]}},
        "models[0].parameters.densty",
        "density",
    ),
}


@pytest.mark.parametrize("level", sorted(MISSPELLED))
def test_misspelled_parameter_is_refused_by_merge(monkeypatch, capsys, work, pool, level):
    """Once merged without a word at the parameter's default (density 1, lambda 1)."""
    changes, path, closest = MISSPELLED[level]
    merge_fails(
        monkeypatch, capsys, work, ties_recipe(pool, **changes), path, f"did you mean {closest!r}"
    )


@pytest.mark.parametrize("level", sorted(MISSPELLED))
def test_misspelled_parameter_is_refused_by_eval_of_a_recipe(
    monkeypatch, capsys, work, pool, level
):
    changes, path, closest = MISSPELLED[level]
    file = work / "recipe.yaml"
    file.write_text(yaml.safe_dump(ties_recipe(pool, **changes)))
    before = snapshot(work)
    code, err = cli(
        monkeypatch,
        capsys,
        "eval",
        str(file),
        "--tasks",
        "evomerge_add",
        "--out",
        str(work / "scores.json"),
    )
    assert_one_sentence(code, err, path, f"did you mean {closest!r}")
    assert snapshot(work) == before, "something was written"


def test_layer_range_beyond_the_model(monkeypatch, capsys, work, pool):
    recipe = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(pool["ft0"]), "layer_range": [2, 9]}]}],
    }
    merge_fails(monkeypatch, capsys, work, recipe, "layer_range", "4 layers")


def test_output_folder_that_exists(monkeypatch, capsys, work, pool):
    out = work / "out" / "model"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    err = merge_fails(
        monkeypatch, capsys, work, linear_recipe(pool["ft0"], pool["ft1"]), "exists", "--force"
    )
    assert (out / "keep.txt").read_text() == "mine" and err


# --- searches ---------------------------------------------------------------------------------
def search_config(work: Path, pool: Path, **changes) -> Path:
    config = pool_search_config(
        pool,
        tasks=["evomerge_add", "evomerge_rev"],
        subset=4,
        batch_size=32,
        search={"sampler": "cmaes", "trials": 2, "seed": 0},
    )
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = config
        for part in parents:
            node = node[part]
        node[key] = value
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def search_fails(work: Path, config: Path, *needles: str, args: tuple[str, ...] = ()) -> float:
    before = snapshot(work)
    started = time.perf_counter()
    result = evomerge("search", str(config), "--run-dir", str(work / "runs" / "run"), *args)
    assert_one_sentence(result.returncode, result.stderr, *needles, progress_before=True)
    assert snapshot(work) == before, "the failed set-up left files behind"
    return time.perf_counter() - started


def test_unknown_sampler(work, small_pool):
    search_fails(
        work, search_config(work, small_pool, search__sampler="cmaez"), "search.sampler", "cmaes"
    )


# `--trials 0` only creates the study for workers; it must refuse what they would refuse
ALSO_WITH_TRIALS_0 = pytest.mark.parametrize(
    "args", [(), ("--trials", "0")], ids=["search", "trials-0"]
)


@pytest.mark.slow
@ALSO_WITH_TRIALS_0
def test_unknown_task(work, small_pool, args):
    config = search_config(work, small_pool, fitness__tasks=["evomerge_ad"])
    search_fails(work, config, "unknown lm-eval task 'evomerge_ad'", "evomerge_add", args=args)


@pytest.mark.slow
@ALSO_WITH_TRIALS_0
def test_unknown_metric(work, small_pool, args):
    config = search_config(
        work, small_pool, fitness__tasks=[{"name": "evomerge_add", "metric": "acuracy"}]
    )
    search_fails(work, config, "no metric 'acuracy'", "acc", args=args)


@pytest.mark.slow
def test_missing_task_data_file(work, small_pool):
    tasks = shutil.copytree(small_pool / "tasks", work / "tasks")
    data = next(p for p in tasks.rglob("*.jsonl") if "add" in p.name)
    data.unlink()
    config = search_config(work, small_pool, fitness__task_paths=[str(tasks)])
    search_fails(work, config, "task data", data.name)


@pytest.mark.slow
def test_unreachable_storage_is_one_sentence_and_quick(work, small_pool):
    config = search_config(
        work, small_pool, search__storage="postgresql://evomerge@127.0.0.1:1/nothing"
    )
    seconds = search_fails(work, config, "postgresql://evomerge@127.0.0.1:1/nothing")
    assert seconds < 60


@pytest.mark.slow
def test_nan_in_a_pool_model_is_refused_at_search_set_up(work, small_pool):
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(small_pool / "rev", work / "rev-nan")
    file = next(broken.glob("*.safetensors"))
    tensors = load_file(file)
    name = next(n for n in tensors if ".mlp." in n)
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    config = search_config(
        work, small_pool, pool__models={"add": str(small_pool / "add"), "rev": str(broken)}
    )
    search_fails(work, config, "NaN", name)


def test_search_space_bounds_outside_the_limits(work, small_pool):
    space = {"method": "ties", "search": {"weight": [0.0, 1.0], "density": [0.5, 1.5]}}
    search_fails(work, search_config(work, small_pool, space=space), "'density'", "[0, 1]")


@pytest.mark.parametrize(
    "space, needles",
    [
        (
            {"method": "ties", "search": {"weight": None, "densty": [0.1, 1.0]}},
            ("search.densty", "did you mean 'density'"),
        ),
        (
            {"method": "ties", "search": {"weight": None}, "fixed": {"lamda": 3}},
            ("fixed.lamda", "did you mean 'lambda'"),
        ),
        (
            {"method": "ties", "search": {"weight": None}, "fixed": {"int8_mask": 3}},
            ("fixed.int8_mask", "bool", "3"),
        ),
    ],
    ids=["search", "fixed", "fixed-value"],
)
def test_misspelled_parameter_in_an_inline_space(work, small_pool, space, needles):
    search_fails(work, search_config(work, small_pool, space=space), *needles)


@pytest.mark.parametrize(
    "space, name, floats",
    [
        ({"method": "karcher", "search": {"max_iter": [2, 20]}}, "max_iter", "tol"),
        (
            {"method": "ties", "search": {"weight": None, "int8_mask": [0, 1]}},
            "int8_mask",
            "weight, density, lambda",
        ),
    ],
)
def test_only_float_parameters_can_be_searched(work, small_pool, space, name, floats):
    """An int or bool gene was accepted and the search then stopped at its first candidate with
    "parameter 'max_iter' ... must be a finite int, got 10.5", which named no cause."""
    search_fails(
        work,
        search_config(work, small_pool, space=space),
        f"search.{name}",
        "only float parameters",
        floats,
    )


@pytest.mark.slow
@ALSO_WITH_TRIALS_0
def test_a_first_fidelity_rung_larger_than_a_task_is_refused(work, small_pool, args):
    from evomerge.pool import N_DEV

    config = search_config(work, small_pool, fitness__subset={"count": N_DEV + 1})
    search_fails(
        work,
        config,
        f"fitness.subset.count {N_DEV + 1} is more than the {N_DEV} dev examples",
        "fidelity: null",
        args=args,
    )


@pytest.mark.parametrize(
    "search, needles",
    [
        ({"fidelity": {"eta": 1}}, ("search.fidelity.eta", "greater than 1")),
        (
            {"promotion": {"quantile": 0.75}},
            ("search.promotion was replaced by search.fidelity", "fidelity: null"),
        ),
    ],
    ids=["eta-1", "promotion"],
)
def test_a_fidelity_schedule_that_cannot_be_met_is_refused(work, small_pool, search, needles):
    config = search_config(work, small_pool, search={"sampler": "cmaes", "trials": 2, **search})
    search_fails(work, config, *needles)


def test_missing_pool_model(work, small_pool):
    config = search_config(work, small_pool, pool__base=str(work / "nowhere"))
    search_fails(work, config, "nowhere", "does not exist")


def test_run_folder_of_an_incompatible_version(work, small_pool):
    from evomerge.search.config import load_run_config
    from evomerge.search.run_folder import write_run_folder

    run_dir = work / "old-run"
    write_run_folder(load_run_config(search_config(work, small_pool)), run_dir)
    meta = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(
        json.dumps({**meta, "run_format": 999, "evomerge_version": "9.9"})
    )
    before = snapshot(work)
    for command in ("resume", "worker"):
        result = evomerge(command, str(run_dir))
        assert_one_sentence(result.returncode, result.stderr, "9.9", "run format 999")
    result = evomerge("export", str(run_dir), str(work / "exported"))
    assert_one_sentence(result.returncode, result.stderr, "run format 999")
    assert snapshot(work) == before


# --- model folders, by class (issue 30) -------------------------------------------------------
def _edit_config(**changes):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))

    return edit


def _config_a_folder(folder: Path) -> None:
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()


def _deep_header(folder: Path) -> None:
    """A safetensors header nested 100 000 deep: Python's JSON parser recurses on it."""
    file = folder / "model.safetensors"
    header = b"[" * 100_000 + b"]" * 100_000
    file.write_bytes(len(header).to_bytes(8, "little") + header + file.read_bytes()[8:])


def _fp8_tensor(folder: Path) -> None:
    """Real FP8 checkpoints exist (dtype F8_E4M3); the merge arithmetic does not handle them."""
    rewrite_tensors(folder, lambda t: t.update(lm_head=t["lm_head.weight"].to(torch.float8_e4m3fn)))


BROKEN_FOLDERS = {  # case -> (what is done to a copy of a model folder, words of the message)
    "config-is-a-list": (lambda f: (f / "config.json").write_text("[1, 2]"), ("JSON list",)),
    "config-not-utf8": (
        lambda f: (f / "config.json").write_bytes(b'{"model_type": "caf\xe9"}'),
        ("config.json", "not UTF-8"),
    ),
    "config-is-a-folder": (_config_a_folder, ("config.json", "directory")),
    "layer-count-a-word": (_edit_config(num_hidden_layers="two"), ("whole number", "'two'")),
    "index-without-weight-map": (
        lambda f: (f / "model.safetensors.index.json").write_text('{"metadata": {}}'),
        ("index", "weight_map"),
    ),
    "header-nested-too-deep": (_deep_header, ("unreadable safetensors header",)),
    "fp8-tensor": (_fp8_tensor, ("F8_E4M3", "convert")),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FOLDERS))
def test_a_broken_model_folder_is_one_sentence(monkeypatch, capsys, work, pool, case):
    """Each once ended in a traceback (AttributeError, UnicodeDecodeError, IsADirectoryError,
    ValueError, RecursionError, KeyError) instead of naming the file and the fix."""
    break_it, needles = BROKEN_FOLDERS[case]
    broken = copy_model(pool["ft1"], work / "broken")
    break_it(broken)
    merge_fails(monkeypatch, capsys, work, linear_recipe(pool["ft0"], broken), *needles)


# --- recipes, by class --------------------------------------------------------------------------
def _stages(first_name: str, pool) -> str:
    """A two-stage recipe (mergekit-multi) whose first stage is called `first_name`."""
    first = yaml.safe_dump({"name": first_name, **linear_recipe(pool["ft0"], pool["ft1"])})
    final = yaml.safe_dump(linear_recipe(Path(first_name), pool["ft0"]))
    return f"{first}---\n{final}"


BAD_RECIPES = {  # case -> (recipe text for the pool, words of the message)
    "no-slices": (lambda p: "merge_method: passthrough\nslices: []\n", ("'slices' is empty",)),
    "stage-name-too-long": (lambda p: _stages("s" * 300, p), ("at most 100",)),
    "stage-name-with-nul": (lambda p: _stages("a\0b", p), ("printable",)),
    "recipe-too-large": (
        lambda p: yaml.safe_dump(linear_recipe(p["ft0"], p["ft1"])) + "#" * (2 << 20) + "\n",
        ("bytes", "limit"),
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_a_bad_recipe_is_one_sentence(monkeypatch, capsys, work, pool, case):
    """Once an IndexError, an OSError after the first stage's merge, and ten minutes of
    parsing for a 100 MB recipe."""
    text, needles = BAD_RECIPES[case]
    merge_fails(monkeypatch, capsys, work, text(pool), *needles)


# --- command-line options, by class ----------------------------------------------------------
BAD_OPTIONS = {  # case -> (command line after `evomerge`, with {recipe} and {out}; words)
    "shard-size-inf": (("merge", "{recipe}", "{out}", "--shard-size", "infGB"), ("infGB",)),
    "shard-size-0": (("merge", "{recipe}", "{out}", "--shard-size", "0"), ("positive size",)),
    "device-banana": (("merge", "{recipe}", "{out}", "--device", "banana"), ("'banana'",)),
    "merge-threads-negative": (("merge", "{recipe}", "{out}", "--threads", "-1"), ("--threads",)),
    "eval-threads-0": (("eval", "{recipe}", "--tasks", "a", "--threads", "0"), ("--threads",)),
    "eval-batch-size-0": (("eval", "{recipe}", "--tasks", "a", "--batch-size", "0"), ("--batch",)),
    "resume-trials-negative": (("resume", "{out}", "--trials", "-1"), ("--trials",)),
    "worker-trials-negative": (("worker", "{out}", "--trials", "-1"), ("--trials",)),
    "worker-device-banana": (("worker", "{run}", "--device", "banana"), ("'banana'",)),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_a_bad_option_is_refused_before_any_work(monkeypatch, capsys, work, pool, case):
    """`--threads -1` and `--device banana` were tracebacks, `--shard-size infGB` an
    OverflowError, `resume --trials -1` was accepted (exit 0)."""
    args, needles = BAD_OPTIONS[case]
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(linear_recipe(pool["ft0"], pool["ft1"])))
    run = _run_folder(work) if "{run}" in args else None
    before = snapshot(work)
    fill = {"recipe": str(recipe), "out": str(work / "out"), "run": str(run)}
    code, err = cli(monkeypatch, capsys, *(a.format(**fill) for a in args))
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.lower().startswith("error: ") and all(n in last for n in needles), err
    assert snapshot(work) == before, "something was written"


# --- output places, checked before the work ---------------------------------------------------
def _no_work(monkeypatch) -> None:
    """Loading a model or building a pool is the work: a check after it fails the test."""
    import evomerge.fitness.live_model
    import evomerge.pool

    def work_started(*args, **kwargs):
        raise AssertionError("the work started before the output place was checked")

    monkeypatch.setattr(evomerge.fitness.live_model, "load_live_model", work_started)
    monkeypatch.setattr(evomerge.pool, "build_pool", work_started)


def _multi_stage(work: Path, pool) -> Path:
    file = work / "stages.yaml"
    file.write_text(_stages("first", pool))
    return file


UNWRITABLE = {  # case -> command line after `evomerge`, writing under {blocked} (a file)
    "eval-out": lambda work, pool: (
        "eval",
        str(pool["ft0"]),
        "--tasks",
        "evomerge_add",
        "--out",
        "{blocked}/scores.json",
    ),
    "report-out": lambda work, pool: (
        "report",
        str(_run_folder(work)),
        "--no-held-out",
        "--out",
        "{blocked}/report",
    ),
    "pool-demo": lambda work, pool: ("pool", "demo", "{blocked}/pool", "--size", "small"),
    "multi-stage-merge": lambda work, pool: ("merge", str(_multi_stage(work, pool)), "{blocked}/m"),
    "export": lambda work, pool: ("export", str(_run_folder(work)), "{blocked}/model"),
}


def _run_folder(work: Path) -> Path:
    from test_report import make_run_folder

    return make_run_folder(work / "run")


@pytest.mark.parametrize("case", sorted(UNWRITABLE))
def test_an_unwritable_output_place_is_refused_before_the_work(
    monkeypatch, capsys, work, pool, case
):
    """Each was an OSError traceback, `eval` and the multi-stage merge only after the work."""
    args = UNWRITABLE[case](work, pool)
    (work / "blocked").write_text("a file where a folder was expected")
    _no_work(monkeypatch)
    before = snapshot(work)
    code, err = cli(monkeypatch, capsys, *(a.format(blocked=work / "blocked") for a in args))
    assert_one_sentence(code, err, "is a file, not a folder")
    assert snapshot(work) == before, "something was written"


def test_an_output_that_is_a_mount_point_is_refused_before_the_work(
    monkeypatch, capsys, work, pool
):
    """A container volume: the final rename failed with EBUSY after the whole merge."""
    mount = work / "volume"
    mount.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == mount or real(p))
    (work / "recipe.yaml").write_text(yaml.safe_dump(linear_recipe(pool["ft0"], pool["ft1"])))
    before = snapshot(work)
    code, err = cli(monkeypatch, capsys, "merge", str(work / "recipe.yaml"), str(mount))
    assert_one_sentence(code, err, "mount point", "inside it")
    assert snapshot(work) == before


def test_a_killed_multi_stage_merge_leaves_no_intermediates_behind(monkeypatch, capsys, work, pool):
    """`.OUT.stages-*` of a dead process (one full model per stage) is removed by the next
    merge to the same place, as single-stage `.partial` folders are."""
    stale = work / ".m.stages-deadhost.999999999-abcd"
    (stale / "first").mkdir(parents=True)
    from evomerge.io.output import _owner

    dead = work / f".m.stages-{_owner().rsplit('.', 1)[0]}.999999999-abcd"
    (dead / "first").mkdir(parents=True)
    code, err = cli(monkeypatch, capsys, "merge", str(_multi_stage(work, pool)), str(work / "m"))
    assert code == 0, err
    assert not dead.exists() and stale.exists()  # another host's may still be running
    assert sorted(p.name for p in work.iterdir()) == sorted(["m", "stages.yaml", stale.name])


# --- run folders ------------------------------------------------------------------------------
def _gone_study(run: Path) -> None:
    (run / "study.db").unlink()


BROKEN_RUNS = {  # case -> (what is done to a run folder, commands that must refuse, words)
    "pool-json-corrupt": (
        lambda r: (r / "pool.json").write_text("{not json"),
        ("resume",),
        "pool.json",
    ),
    "pool-json-a-list": (lambda r: (r / "pool.json").write_text("[1]"), ("resume",), "pool.json"),
    "run-json-a-list": (
        lambda r: (r / "run.json").write_text("[]"),
        ("resume", "report", "export"),
        "run.json",
    ),
    "no-study": (_gone_study, ("resume", "report", "export", "worker"), "study.db"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_RUNS))
def test_a_broken_run_folder_is_one_sentence_and_gets_nothing_written(
    monkeypatch, capsys, work, case
):
    """A corrupt pool.json was a JSONDecodeError; `resume`/`report` on a run without its
    study.db created an empty one."""
    break_it, commands, needle = BROKEN_RUNS[case]
    run = _run_folder(work)
    break_it(run)
    before = snapshot(work)
    for command in commands:
        extra = (str(work / "exported"),) if command == "export" else ()
        extra += ("--no-held-out",) if command == "report" else ()
        code, err = cli(monkeypatch, capsys, command, str(run), *extra)
        assert_one_sentence(code, err, needle)
        assert snapshot(work) == before, f"{command} wrote into the run folder"


# --- resume sees every change to what a trial scores -------------------------------------------
def _append_to(relative: str):
    def change(pool: Path) -> None:
        file = next(pool.glob(relative))
        file.write_text(file.read_text() + "\n")

    return change


def _edit_json(relative: str, **changes):
    def change(pool: Path) -> None:
        file = pool / relative
        file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))

    return change


POOL_CHANGES = {  # case -> (change to a copied pool, the name `resume` must give)
    "config": (_edit_json("rev/config.json", rms_norm_eps=0.5), "rev"),
    "tokenizer": (_edit_json("base/tokenizer_config.json", model_max_length=7), "base"),
    "task-yaml": (_append_to("tasks/*add*.yaml"), "task files"),
    "task-data": (_append_to("tasks/**/*add_dev*.jsonl"), "task files"),
}


@pytest.fixture
def copied_pool(small_pool, work) -> Path:
    return shutil.copytree(small_pool, work / "pool")


@pytest.mark.parametrize("case", sorted(POOL_CHANGES))
def test_resume_refuses_any_change_to_what_a_trial_scores(copied_pool, work, case):
    """Once only `*.safetensors` were fingerprinted: a changed config or tokenizer was resumed,
    and new trials scored 0.0 beside old 0.69."""
    from evomerge.errors import UserError
    from evomerge.search.config import load_run_config
    from evomerge.search.run_folder import read_run_folder, write_run_folder

    change, name = POOL_CHANGES[case]
    config = load_run_config(search_config(work, copied_pool))
    write_run_folder(config, work / "run")
    (work / "run" / "study.db").touch()  # as the search makes it
    read_run_folder(work / "run")  # unchanged: accepted
    change(copied_pool)
    with pytest.raises(UserError, match=f"pool changed since this run started \\({name}\\)"):
        read_run_folder(work / "run")


def test_a_run_started_before_configs_were_fingerprinted_is_still_checked(copied_pool, work):
    """pool.json from before: weights only, no `task files`; still accepted, still checked."""
    from evomerge.errors import UserError
    from evomerge.io.fingerprint import pool_fingerprints
    from evomerge.search.config import load_run_config
    from evomerge.search.run_folder import read_run_folder, write_run_folder

    config = load_run_config(search_config(work, copied_pool))
    write_run_folder(config, work / "run")
    (work / "run" / "study.db").touch()
    old = pool_fingerprints(config, weights_only=True)
    (work / "run" / "pool.json").write_text(json.dumps(old))
    _edit_json("rev/config.json", rms_norm_eps=0.5)(copied_pool)
    read_run_folder(work / "run")  # the weights did not change
    rewrite_tensors(copied_pool / "rev", lambda t: t["model.norm.weight"].mul_(2))
    with pytest.raises(UserError, match="pool changed"):
        read_run_folder(work / "run")


# --- tasks ------------------------------------------------------------------------------------
def _empty_dev_data(tasks: Path) -> None:
    next(tasks.glob("**/*add_dev*.jsonl")).write_text("")


def _latin1_yaml(tasks: Path) -> None:
    yaml_file = next(tasks.glob("*add*.yaml"))
    yaml_file.write_bytes(b"# \xe9volution\n" + yaml_file.read_bytes())


BROKEN_TASKS = {  # case -> (change to a copy of the demo pool's task folder, words)
    "empty-dev-split": (_empty_dev_data, ("evomerge_add", "empty")),
    "yaml-in-latin-1": (_latin1_yaml, ("not UTF-8", "re-save")),
}


@pytest.mark.parametrize("case", sorted(BROKEN_TASKS))
def test_a_broken_task_is_one_sentence(monkeypatch, capsys, work, small_pool, case):
    """Once a StopIteration from `datasets` and a UnicodeDecodeError."""
    break_it, needles = BROKEN_TASKS[case]
    tasks = shutil.copytree(small_pool / "tasks", work / "tasks")
    break_it(tasks)
    args = ("--task-path", str(tasks), "--tasks", "evomerge_add", "--run-dir", str(work / "r"))
    code, err = cli(monkeypatch, capsys, "eval", str(small_pool / "add"), *args, "--limit", "2")
    assert_one_sentence(code, err, *needles, progress_before=True)


# --- the guarantee, as a property: no command ends in a traceback ------------------------------
COMMANDS = {  # command -> its command line, with the input X in its first argument's place
    "merge": ("merge", "{x}", "{out}"),
    "eval": ("eval", "{x}", "--tasks", "evomerge_add", "--out", "{out}.json"),
    "search": ("search", "{x}", "--run-dir", "{out}"),
    "resume": ("resume", "{x}"),
    "worker": ("worker", "{x}"),
    "report": ("report", "{x}", "--no-held-out"),
    "export": ("export", "{x}", "{out}"),
}


# inputs a command never reads, so it may succeed on them: `report` does not read pool.json
UNREAD = {"report": "run:pool-json"}


@pytest.fixture(scope="module")
def bad_inputs(pool, tmp_path_factory) -> dict[str, Path]:
    """Every bad input of this suite's tables, as files and folders, plus the plain kinds
    (empty, binary, missing): what a user may hand any command by mistake."""
    root = tmp_path_factory.mktemp("bad-inputs")
    inputs = {}
    for case, (break_it, _) in BROKEN_FOLDERS.items():
        inputs[f"folder:{case}"] = copy_model(pool["ft1"], root / f"folder-{case}")
        break_it(inputs[f"folder:{case}"])
        recipe = root / f"recipe-over-{case}.yaml"
        recipe.write_text(yaml.safe_dump(linear_recipe(pool["ft0"], inputs[f"folder:{case}"])))
        inputs[f"recipe-over:{case}"] = recipe
    from helpers.tiny_models import write_adapter
    from test_adapters import BROKEN_ADAPTERS

    for case, (break_it, _) in BROKEN_ADAPTERS.items():
        adapter = write_adapter(root / f"adapter-{case}", pool["base"])
        break_it(adapter)
        recipe = root / f"recipe-over-adapter-{case}.yaml"
        recipe.write_text(yaml.safe_dump(linear_recipe(f"{pool['base']}+{adapter}")))
        inputs[f"recipe-over-adapter:{case}"] = recipe
    for case, (text, _) in BAD_RECIPES.items():
        inputs[f"recipe:{case}"] = root / f"recipe-{case}.yaml"
        inputs[f"recipe:{case}"].write_text(text(pool))
    for case, (break_it, _, _) in BROKEN_RUNS.items():
        (root / f"run-{case}").mkdir()
        inputs[f"run:{case}"] = _run_folder(root / f"run-{case}")
        break_it(inputs[f"run:{case}"])
    (root / "empty.yaml").write_text("")
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (root / "empty-folder").mkdir()
    inputs.update(
        {
            "empty-file": root / "empty.yaml",
            "binary-file": root / "binary.yaml",
            "empty-folder": root / "empty-folder",
            "missing": root / "missing",
        }
    )
    return inputs


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_command_ends_in_a_traceback_on_any_bad_input(
    monkeypatch, capsys, tmp_path, bad_inputs, command
):
    """The README's promise as a property: every bad input of these suites, handed to every
    command, ends in exit code 2 and an `error:` line, never in a traceback."""
    broken = []
    for name, path in bad_inputs.items():
        out = tmp_path / f"out-{len(broken)}-{name.replace(':', '-')}"
        args = [a.format(x=path, out=out) for a in COMMANDS[command]]
        try:
            code, err = cli(monkeypatch, capsys, *args)
        except Exception as exc:  # escaped the entry point: a traceback for the user
            code, err = "raised", f"{type(exc).__name__}: {exc}"
        last = (err.strip().splitlines() or [""])[-1].rsplit("\r", 1)[-1]
        refused = code == 2 and last.lower().startswith("error: ")
        if not (refused or (code == 0 and name.startswith(UNREAD.get(command, "-")))):
            broken.append(f"{name}: exit {code}: {err.strip()[-300:]}")
        elif "Traceback" in err:
            broken.append(f"{name}: exit {code}: {err.strip()[-300:]}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("where", ["missing/study.log", "blocked/study.log"])
def test_a_journal_storage_in_an_unusable_folder_is_one_sentence(work, small_pool, where):
    """A journal file in a missing folder, or under a file: once a FileNotFoundError."""
    (work / "blocked").write_text("a file where a folder was expected")
    config = search_config(work, small_pool, search__storage=f"journal:{work / where}")
    search_fails(work, config, "cannot open study storage", "must exist and be writable")


@pytest.mark.parametrize(
    "args",
    [("merge", "{big}", "{out}"), ("search", "{big}"), ("eval", "{model}", "--config", "{big}")],
    ids=["recipe", "search-config", "fitness-config"],
)
def test_an_oversized_recipe_or_config_is_refused_before_parsing(
    monkeypatch, capsys, work, pool, args
):
    """A 100 MB recipe ran for over ten minutes (a 5 MB one: 94 s and 570 MB)."""
    big = work / "big.yaml"
    big.write_text("merge_method: linear\n" + "#" * (2 << 20) + "\n")
    before = snapshot(work)
    fill = {"big": str(big), "out": str(work / "out"), "model": str(pool["ft0"])}
    started = time.perf_counter()
    code, err = cli(monkeypatch, capsys, *(a.format(**fill) for a in args))
    assert_one_sentence(code, err, "big.yaml", "limit")
    assert time.perf_counter() - started < 30 and snapshot(work) == before
