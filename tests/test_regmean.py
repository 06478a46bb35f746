"""RegMean (`merge_method: regmean`): the least-squares merge of each linear layer, its
statistics collected from the dev documents, searched and refined inside a study.

The method against the closed form it writes (and the least-squares optimum it claims); a
recipe with statistics files merged by `evomerge merge`; bad statistics refused in one
sentence; the collector's Gram matrices against X^T X / N taken by hand, one per distinct
input; the files (float16, each input once) against the float32 matrices, and the files of
earlier runs (float32 per weight) read as written; a search over
`regmean_layers` whose first baseline is RegMean itself, whose refined trial exports bit for
bit, and whose statistics a resumed run reuses.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml
from helpers.tiny_models import build_tiny_pool
from safetensors.torch import load_file, save_file


def _grams(width: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(3 * width, width, generator=gen, dtype=torch.float64)
        out.append(x.T @ x / x.shape[0])
    return out


def _inputs(base, models, grams=None):
    from evomerge.methods.registry import MergeInputs

    return MergeInputs(models=models, base=base, tensor_name="w", grams=grams)


def test_uniform_weights_are_the_least_squares_merge():
    """alpha 1: W* = (sum W_i G_i)(sum G_i)^-1, and it zeroes the gradient of
    sum_i ||X_i W^T - X_i W_i^T||^2 (RegMean's objective)."""
    from evomerge.methods.regmean import regmean

    gen = torch.Generator().manual_seed(1)
    base = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    models = [base + 0.1 * torch.randn(5, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    grams = _grams(4, 3)
    merged = regmean(_inputs(base, models, grams), weight=[1 / 3] * 3, alpha=1.0, lambda_=1.0)
    closed = sum(w @ g for w, g in zip(models, grams)) @ torch.linalg.inv(sum(grams))
    torch.testing.assert_close(merged, closed, rtol=1e-5, atol=1e-6)  # float32 inside
    gradient = sum((merged.double() - w) @ g for w, g in zip(models, grams))
    assert gradient.abs().max() < 1e-5


def test_alpha_weights_and_lambda_read_like_the_equation():
    """theta = base + lambda * sum_i w_i tau_i G_i Gbar^-1 with G_i's off-diagonal shrunk by
    alpha; a tensor without statistics is a weighted sum of task vectors."""
    from evomerge.methods.regmean import regmean

    gen = torch.Generator().manual_seed(2)
    base = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    models = [base + 0.1 * torch.randn(6, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    grams, alpha, weight, lam = _grams(4, 2, seed=3), 0.8, [0.7, 0.2], 1.3
    shrunk = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
    mean_inverse = torch.linalg.inv(sum(shrunk) / 2)
    want = base + lam * sum(
        w * (m - base) @ g @ mean_inverse for w, m, g in zip(weight, models, shrunk)
    )
    got = regmean(_inputs(base, models, grams), weight=weight, alpha=alpha, lambda_=lam)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    plain = regmean(_inputs(base, models, None), weight=weight, alpha=alpha, lambda_=lam)
    want = base + lam * sum(w * (m - base) for w, m in zip(weight, models))
    torch.testing.assert_close(plain, want, rtol=1e-6, atol=1e-6)


def test_an_embedding_takes_each_row_by_token_frequency():
    """One-hot inputs: a diagonal Gram matrix, stored per row. A row no data reaches is the
    plain mean; alpha shrinks the frequencies toward their mean."""
    from evomerge.methods.regmean import regmean

    gen = torch.Generator().manual_seed(4)
    base = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    models = [base + torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(2)]
    counts = [torch.tensor([3.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 1.0])]
    got = regmean(_inputs(base, models, counts), weight=[0.5, 0.5], alpha=1.0, lambda_=1.0)
    torch.testing.assert_close(got[0], (3 * models[0][0] + models[1][0]) / 4)
    torch.testing.assert_close(got[1], (models[0][1] + models[1][1]) / 2)
    torch.testing.assert_close(got[2], (models[0][2] + models[1][2]) / 2)
    shrunk = regmean(_inputs(base, models, counts), weight=[0.5, 0.5], alpha=0.5, lambda_=1.0)
    c0, c1 = 0.5 * 3 + 0.5 * 4 / 3, 0.5 * 1 + 0.5 * 2 / 3  # toward each model's mean count
    torch.testing.assert_close(shrunk[0], (c0 * models[0][0] + c1 * models[1][0]) / (c0 + c1))


def test_the_projections_are_computed_once_per_alpha():
    from evomerge.methods.regmean import projections, regmean

    base = torch.zeros(3, 2)
    inputs = _inputs(base, [torch.ones(3, 2), -torch.ones(3, 2)], [torch.eye(2), 2 * torch.eye(2)])
    regmean(inputs, weight=[0.5, 0.5], alpha=0.9, lambda_=1.0)
    first = projections(inputs, 0.9)
    regmean(inputs, weight=[0.1, 0.9], alpha=0.9, lambda_=1.0)
    assert projections(inputs, 0.9) is first  # kept with the inputs, not recomputed


# --- recipes -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("regmean")
    folders = build_tiny_pool(root, n_models=2)
    stats = {}
    for i, name in enumerate(("ft0", "ft1")):
        weights = load_file(str(folders[name] / "model.safetensors"))
        grams = {
            k: g.float()
            for k, v in weights.items()
            if v.dim() == 2 and "embed" not in k
            for g in _grams(v.shape[1], 1, seed=10 * i + len(k))
        }
        stats[name] = root / f"{name}.safetensors"
        save_file(grams, str(stats[name]))
    return folders, stats, root


def _recipe(folders, stats, **extra) -> dict:
    data = {
        "merge_method": "regmean",
        "base_model": str(folders["base"]),
        "models": [
            {"model": str(folders["ft0"]), "parameters": {"weight": 0.5}},
            {"model": str(folders["ft1"]), "parameters": {"weight": 0.5}},
        ],
        "parameters": {"alpha": 0.9},
        "dtype": "float32",
        "statistics": {str(folders[n]): str(stats[n]) for n in ("ft0", "ft1")},
    }
    data.update(extra)
    return data


def test_a_recipe_with_statistics_merges_by_the_equation(tmp_path, tiny):
    from evomerge.merging.executor import run_merge
    from evomerge.merging.recipe import parse_recipe
    from evomerge.methods.regmean import regmean

    folders, stats, _ = tiny
    recipe = parse_recipe(yaml.safe_dump(_recipe(folders, stats)))
    run_merge(recipe, tmp_path / "out")
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    base = load_file(str(folders["base"] / "model.safetensors"))
    models = [load_file(str(folders[n] / "model.safetensors")) for n in ("ft0", "ft1")]
    grams = [load_file(str(stats[n])) for n in ("ft0", "ft1")]
    name = "model.layers.1.mlp.down_proj.weight"
    want = regmean(
        _inputs(base[name], [m[name] for m in models], [g[name] for g in grams]),
        weight=[0.5, 0.5],
        alpha=0.9,
        lambda_=1.0,
    )
    assert torch.equal(merged[name], want)
    norm = "model.layers.1.input_layernorm.weight"  # no statistics: the mean task vector
    torch.testing.assert_close(merged[norm], (models[0][norm] + models[1][norm]) / 2)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"statistics": None}, "needs each model's input statistics"),
        ({"merge_method": "task_arithmetic", "parameters": None}, "reads no 'statistics'"),
        ("missing-file", "does not exist"),
        ("not-merged", "which the recipe does not merge"),
        ("wrong-shape", "must be a (32, 32) float matrix"),
        ("not-safetensors", "cannot be read"),
        ("nan", "hold NaN or Inf values"),
    ],
)
def test_bad_statistics_are_refused_in_one_sentence(tmp_path, tiny, change, words):
    folders, stats, root = tiny
    data = _recipe(folders, stats)
    first = str(folders["ft0"])
    if change == "missing-file":
        data["statistics"][first] = str(tmp_path / "none.safetensors")
    elif change == "not-merged":
        data["statistics"][str(tmp_path)] = str(stats["ft0"])
    elif change == "wrong-shape":
        bad = tmp_path / "bad.safetensors"
        save_file({"model.layers.0.self_attn.q_proj.weight": torch.eye(3)}, str(bad))
        data["statistics"][first] = str(bad)
    elif change == "nan":
        bad = tmp_path / "bad.safetensors"
        grams = load_file(str(stats["ft0"]))
        grams["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
        save_file(grams, str(bad))
        data["statistics"][first] = str(bad)
    elif change == "not-safetensors":
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"\x00" * 64)
        data["statistics"][first] = str(bad)
    else:
        data.update(change)
        data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    result = subprocess.run(
        [sys.executable, "-m", "evomerge", "merge", str(path), str(tmp_path / "out")],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and words in errors[0], result.stderr
    assert not (tmp_path / "out").exists()


# --- statistics from data ------------------------------------------------------------------
def test_the_collector_takes_x_transpose_x_over_the_real_tokens(tiny):
    """Against hooks that keep every input by hand: padding left out, divided by the token
    count; each task goes to the model with the lowest answer NLL."""
    from transformers import LlamaForCausalLM

    from evomerge.fitness.statistics import _gram_matrices, gram_matrices, owners
    from evomerge.fitness.teacher import Example

    folders, _, _ = tiny
    model = LlamaForCausalLM.from_pretrained(folders["ft0"]).eval()
    examples = [
        Example("t", 0, (1, 2, 3, 4, 5), 2),
        Example("t", 1, (6, 7, 8), 1),
        Example("u", 2, (9, 10, 11, 12), 1),
    ]
    grams = gram_matrices(model, examples)
    module = model.model.layers[2].mlp.down_proj
    kept = []
    handle = module.register_forward_hook(lambda m, i, o: kept.append(i[0][0].detach()))
    with torch.no_grad():
        for e in examples:
            model(torch.tensor([e.tokens[:-1]]))
    handle.remove()
    x = torch.cat(kept).double()
    want = x.T @ x / x.shape[0]
    torch.testing.assert_close(
        grams["model.layers.2.mlp.down_proj.weight"].double(), want, rtol=1e-4, atol=1e-6
    )
    counts = grams["model.embed_tokens.weight"]
    tokens = torch.tensor([t for e in examples for t in e.tokens[:-1]])
    want = torch.bincount(tokens, minlength=counts.shape[0]).float() / len(tokens)
    torch.testing.assert_close(counts, want)
    assert owners({"a": {"t": 0.5, "u": 2.0}, "b": {"t": 0.7, "u": 1.0}}) == {"t": "a", "u": "b"}
    # layers handed the same input share one matrix, equal to what each would take alone
    layers = model.config.num_hidden_layers
    for layer in range(layers):
        attn, mlp = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.mlp."
        assert grams.same_input[f"{attn}k_proj.weight"] == f"{attn}q_proj.weight"
        assert grams.same_input[f"{attn}v_proj.weight"] == f"{attn}q_proj.weight"
        assert grams.same_input[f"{mlp}up_proj.weight"] == f"{mlp}gate_proj.weight"
    assert len(grams.same_input) == 3 * layers and not set(grams.same_input) & set(grams.tensors)
    alone = _gram_matrices(model, examples, share=False)
    assert not alone.same_input and set(alone.tensors) == set(grams.tensors) | set(grams.same_input)
    assert all(torch.equal(grams[name], alone[name]) for name in alone.tensors)


def test_a_statistics_file_stores_each_input_once_in_float16(tmp_path, tiny):
    """Version 2: one float16 correlation and float32 scales per distinct input, read back as
    the Gram matrix to float16's precision on the correlation, the diagonal near exact; a file
    of an earlier run (version 1: float32 per weight, no metadata) reads as written; an unknown
    version is refused in one sentence."""
    from transformers import LlamaForCausalLM

    from evomerge.errors import UserError
    from evomerge.fitness.statistics import gram_matrices
    from evomerge.fitness.teacher import Example
    from evomerge.io.statistics import InputStatistics, pack

    folders, _, _ = tiny
    model = LlamaForCausalLM.from_pretrained(folders["ft0"]).eval()
    examples = [Example("t", i, tuple(range(1 + i, 9 + i)), 2) for i in range(6)]
    grams = gram_matrices(model, examples)
    tensors, metadata = pack(grams.tensors, grams.same_input)
    save_file(tensors, str(tmp_path / "v2.safetensors"), metadata=metadata)
    every = {name: grams[name].clone() for name in [*grams.tensors, *grams.same_input]}
    save_file(every, str(tmp_path / "v1.safetensors"))
    v2 = InputStatistics({"m": str(tmp_path / "v2.safetensors")})
    v1 = InputStatistics({"m": str(tmp_path / "v1.safetensors")})
    shapes = {k: v.shape for k, v in load_file(str(folders["ft0"] / "model.safetensors")).items()}
    for name, want in every.items():
        assert v2.check("m", name, tuple(shapes[name])) and v1.check("m", name, shapes[name])
        assert torch.equal(v1.gram("m", name), want)
        got = v2.gram("m", name)
        if want.dim() == 1:
            assert torch.equal(got, want)
            continue
        scale = torch.diagonal(want).sqrt()
        bound = 2**-11 * scale[:, None] * scale[None, :]  # float16's rounding of C in [-1, 1]
        assert ((got - want).abs() <= bound + 1e-12).all(), name
        torch.testing.assert_close(torch.diagonal(got), torch.diagonal(want), rtol=1e-6, atol=0)
    linear = [n for n in every if every[n].dim() == 2]
    layers = model.config.num_hidden_layers
    assert len(linear) == layers * 7 + 1  # q k v o gate up down per layer, and lm_head
    kept = [n for n in tensors if n.endswith(".weight") and tensors[n].dim() == 2]
    assert len(kept) == layers * 4 + 1 and all(tensors[n].dtype == torch.float16 for n in kept)
    v2_bytes = sum(tensors[n].numel() * 2 for n in kept)
    v1_bytes = sum(every[n].numel() * 4 for n in linear)
    assert v2_bytes < v1_bytes / 3  # half the bytes a matrix; q/k/v, gate/up stored once

    metadata["version"] = "3"
    save_file(tensors, str(tmp_path / "v3.safetensors"), metadata=metadata)
    with pytest.raises(UserError) as refused:
        InputStatistics({"m": str(tmp_path / "v3.safetensors")}).gram("m", linear[0])
    assert "is of version '3'" in str(refused.value) and "\n" not in str(refused.value)


# --- inside a search -----------------------------------------------------------------------
@pytest.mark.slow
def test_a_regmean_search_starts_from_regmean_and_exports_bit_for_bit(tmp_path, small_pool):
    from helpers.pool_fixtures import pool_search_config

    from evomerge.cli.process import set_up_process
    from evomerge.merging.executor import run_merge
    from evomerge.merging.recipe import load_recipe
    from evomerge.results.export import export_trial
    from evomerge.search.config import load_run_config
    from evomerge.search.loop import Search
    from evomerge.search.refine import apply_trial
    from evomerge.search.run_folder import write_run_folder
    from evomerge.spaces.refine import REFINED_ATTR

    torch.set_num_threads(1)
    data = pool_search_config(
        small_pool,
        space="regmean_layers",
        tasks=["evomerge_add", "evomerge_rev", "evomerge_sort"],
        subset=8,
        batch_size=32,
        search={
            "sampler": "random",
            "trials": 3,
            "seed": 1,
            "refine": {"steps": 4, "eval_every": 2, "patience": 2, "batch": 16, "lr": 0.2},
        },
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_run_config(path)
    run_dir = tmp_path / "run"
    set_up_process(threads=1, hf_home=run_dir / "hf", offline=True)
    write_run_folder(config, run_dir)
    search = Search(config, run_dir)
    stats = sorted((run_dir / "statistics").glob("*.safetensors"))
    assert [p.stem for p in stats] == ["add", "rev", "sort"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in stats)  # as a plain write
    stamps = [p.stat().st_mtime_ns for p in stats]
    search.run(until=3, progress=False)

    trials = search.study.get_trials(deepcopy=False)
    assert trials[0].user_attrs["baseline"] == "uniform"  # RegMean itself, queued first
    assert not any(str(t.user_attrs.get("baseline", "")).startswith("only_") for t in trials)
    (refined,) = [t for t in trials if REFINED_ATTR in t.user_attrs]
    apply_trial(search.candidate, refined.params, refined.user_attrs)
    scored = {name: t.detach().clone() for name, t in search.candidate.targets.items()}
    export_trial(run_dir, tmp_path / "export", trial_number=refined.number)
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert all(torch.equal(exported[k], scored[k]) for k in scored)
    recipe = load_recipe(tmp_path / "export" / "recipe.yaml")
    assert recipe.merge_method == "regmean" and recipe.statistics
    run_merge(recipe, tmp_path / "again", seed=config.search.merge_seed)
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(torch.equal(again[k], exported[k]) for k in exported)

    # a resumed run reuses the statistics its first start wrote
    Search(config, run_dir, create=False)
    assert [p.stat().st_mtime_ns for p in stats] == stamps


@pytest.mark.parametrize("what", ["adapter", "backend"])
def test_a_regmean_space_the_run_cannot_collect_for_is_refused(tmp_path, small_pool, what):
    from helpers.pool_fixtures import pool_search_config

    from evomerge.errors import UserError
    from evomerge.search.config import load_run_config

    data = pool_search_config(
        small_pool, space="regmean_layers", tasks=["evomerge_add"], subset=8, search={}
    )
    if what == "adapter":
        data["pool"]["models"]["add"] = f"{data['pool']['base']}+{data['pool']['models']['add']}"
    else:
        data["fitness"]["backend"] = "vllm"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as refused:
        load_run_config(path)
    message = str(refused.value)
    assert "statistics" in message and "\n" not in message
    assert ("LoRA adapter" if what == "adapter" else "'vllm'") in message


@pytest.mark.slow
def test_a_task_without_answers_is_refused_in_one_sentence(tmp_path, small_pool):
    """RegMean's statistics come from the teacher-forced dev documents: a task with no target
    answer gets one sentence naming it and the way out, before any trial."""
    import shutil

    from helpers.pool_fixtures import pool_search_config

    from evomerge.errors import UserError
    from evomerge.search.config import load_run_config
    from evomerge.search.loop import Search
    from evomerge.search.run_folder import write_run_folder

    tasks = tmp_path / "tasks"
    shutil.copytree(small_pool / "tasks", tasks)
    text = (tasks / "evomerge_add.yaml").read_text()
    text = text.replace("task: evomerge_add", "task: evomerge_blank")
    text = "\n".join(
        'doc_to_target: ""' if line.startswith("doc_to_target:") else line
        for line in text.splitlines()
    )
    (tasks / "evomerge_blank.yaml").write_text(text)
    data = pool_search_config(
        small_pool, space="regmean_layers", tasks=["evomerge_blank"], subset=8, search={}
    )
    data["fitness"]["task_paths"] = [str(tasks)]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_run_config(path)
    write_run_folder(config, tmp_path / "run")
    with pytest.raises(UserError) as refused:
        Search(config, tmp_path / "run")
    message = str(refused.value)
    assert "'evomerge_blank' has no target answers" in message and "\n" not in message
    assert "regmean space's input statistics" in message
    assert not (tmp_path / "run" / "statistics").exists()


def test_an_input_no_data_moved_gets_a_ridge_not_a_traceback():
    """A Gram matrix with a zero row and column in every model (an input dimension that is
    always 0 on the data) is singular: that dimension keeps the base, the rest is RegMean."""
    from evomerge.methods.regmean import regmean

    gen = torch.Generator().manual_seed(5)
    base = torch.randn(4, 3, generator=gen)
    models = [base + torch.randn(4, 3, generator=gen) for _ in range(2)]
    grams = []
    for g in _grams(3, 2, seed=6):
        g = g.float().clone()
        g[2, :] = 0
        g[:, 2] = 0
        grams.append(g)
    merged = regmean(_inputs(base, models, grams), weight=[0.5, 0.5], alpha=1.0, lambda_=1.0)
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged[:, 2], base[:, 2], rtol=1e-4, atol=1e-4)
    sub = [g[:2, :2].double() for g in grams]
    closed = sum(m[:, :2].double() @ g for m, g in zip(models, sub)) @ torch.linalg.inv(sum(sub))
    torch.testing.assert_close(merged[:, :2].double(), closed, rtol=1e-4, atol=1e-4)
