"""Multi-stage recipes (mergekit-multi's named documents): every stage equals mergekit 0.1.5's,
`evomerge merge` runs them and writes a recipe mergekit-multi reruns to the same model, and
mistakes in the stage structure are one sentence, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from evomerge.cli import cli
from evomerge.errors import UserError
from evomerge.merging.multistage import load_stages, run_stages

# A + B by SLERP, then that with C by TIES; the last document has no name: the final merge.
TWO_STAGES = """
name: ab
merge_method: slerp
base_model: $ft0
models: [{model: $ft0}, {model: $ft1}]
parameters: {t: [0.2, 0.7]}
---
merge_method: ties
base_model: $base
models:
  - model: ab
    parameters: {weight: 0.6, density: 0.5}
  - model: $ft2
    parameters: {weight: 0.4, density: 0.7}
"""

# Three stages, the final one first in the file; an intermediate saved in bfloat16 and read
# back by the next stage; a stage used twice; slices over a stage's output.
THREE_STAGES = """
merge_method: linear
slices:
  - sources:
      - model: abc
        layer_range: [0, 4]
        parameters: {weight: 0.7}
      - model: ab
        layer_range: [0, 4]
        parameters: {weight: 0.3}
---
name: ab
merge_method: task_arithmetic
base_model: $base
out_dtype: bfloat16
models:
  - model: $ft0
    parameters: {weight: 0.5}
  - model: $ft1
    parameters: {weight: [0.2, 0.9]}
---
name: abc
merge_method: nuslerp
models:
  - model: ab
    parameters: {weight: 0.5}
  - model: $ft2
    parameters: {weight: 0.8}
"""


def _filled(text: str, pool: dict[str, Path]) -> str:
    from helpers.mergekit_env import fill_in_paths

    return fill_in_paths(text, pool)


def _load(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _write(tmp_path: Path, text: str, name: str = "stages.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from helpers.tiny_models import build_tiny_pool

    torch.set_num_threads(1)
    return build_tiny_pool(tmp_path_factory.mktemp("stages-pool"), dtype=torch.float32, seed=11)


@pytest.fixture(scope="module")
def both(pool, tmp_path_factory, mergekit_python):
    """Each recipe merged by evomerge (intermediates kept) and by mergekit-multi; and the
    recipe.yaml evomerge wrote beside its output, rerun by mergekit-multi."""
    from helpers.mergekit_env import run_driver

    root = tmp_path_factory.mktemp("stages")
    jobs, out = [], {}
    for label, text in (("two", TWO_STAGES), ("three", THREE_STAGES)):
        recipe = _write(root, _filled(text, pool), f"{label}.yaml")
        evo, evo_stages = root / "evo" / label, root / "evo-stages" / label
        run_stages(load_stages(recipe), evo, seed=0, intermediate_dir=evo_stages)
        for name, source in (
            (label, recipe.read_text()),
            (f"{label}-rerun", (evo / "recipe.yaml").read_text()),
        ):
            mk, mk_stages = root / "mk" / name, root / "mk-stages" / name
            jobs.append(
                {
                    "name": name,
                    "recipe": source,
                    "out": str(mk),
                    "intermediate_dir": str(mk_stages),
                    "seed": 0,
                }
            )
            out[name] = (evo, evo_stages, mk, mk_stages)
    results = run_driver(mergekit_python, {"threads": 1, "multi": jobs})
    return {name: (*folders, results[name]) for name, folders in out.items()}


@pytest.mark.mergekit
@pytest.mark.parametrize("name", ["two", "three", "two-rerun", "three-rerun"])
def test_every_stage_equals_mergekit_multi(name, both):
    evo, evo_stages, mk, mk_stages, result = both[name]
    assert result["ok"], result.get("traceback")
    stage_names = sorted(p.name for p in mk_stages.iterdir())
    assert stage_names == sorted(p.name for p in evo_stages.iterdir())
    pairs = [(evo_stages / s, mk_stages / s) for s in stage_names] + [(evo, mk)]
    for ours_dir, theirs_dir in pairs:
        ours, theirs = _load(ours_dir), _load(theirs_dir)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].dtype == theirs[key].dtype, (ours_dir.name, key)
            # TIES's top-k could differ at exactly equal |delta| (test_mergekit_golden.py);
            # these fp32 deltas have none.
            assert torch.equal(ours[key], theirs[key]), (ours_dir.name, key)
    if name == "three":  # the bfloat16 intermediate was written and read back as such
        assert {t.dtype for t in _load(evo_stages / "ab").values()} == {torch.bfloat16}


def test_evomerge_merge_runs_the_stages_and_writes_them_beside_the_model(pool, tmp_path):
    recipe = _write(tmp_path, _filled(TWO_STAGES, pool))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["merge", str(recipe), str(out)])
    assert result.exit_code == 0, result.output
    written = load_stages(out / "recipe.yaml")
    assert [s.name for s in written] == ["ab", None]
    assert written[1].recipe.models[0].model == "ab"  # the stage by name, not a scratch path
    # The scratch folder of the intermediates is gone; only the output is left.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "stages.yaml"]
    one_shot = run_stages(load_stages(out / "recipe.yaml"), tmp_path / "again", seed=0)
    ours, again = _load(out), _load(one_shot.out_dir)
    assert all(torch.equal(ours[k], again[k]) for k in ours)


def test_stages_the_final_merge_does_not_use_are_skipped(pool, tmp_path):
    text = (
        _filled(TWO_STAGES, pool)
        + "---\nname: unused\nmerge_method: linear\nmodels: [{model: nowhere}]\n"
    )
    summary = run_stages(load_stages(_write(tmp_path, text)), tmp_path / "out", seed=0)
    assert summary.out_dir == tmp_path / "out"  # the missing model of `unused` was never read


def _linear(name, model: str) -> str:
    head = f"name: {name}\n" if name else ""
    return (
        head + f"merge_method: linear\nmodels: [{{model: {model}, parameters: {{weight: 1.0}}}}]\n"
    )


@pytest.mark.parametrize(
    "text, fragment",
    [
        (_linear("a", "$ft0") + "---\n" + _linear("a", "a"), "two stages are named 'a'"),
        (
            _linear(None, "$ft0") + "---\n" + _linear(None, "$ft1"),
            "more than one document has no name",
        ),
        (_linear("a", "b") + "---\n" + _linear("b", "a"), "in a cycle (b -> a -> b)"),
        (
            _linear("x/y", "$ft0") + "---\n" + _linear(None, "x/y"),
            "name 'x/y' must be a plain word",
        ),
        (_linear("a", "$ft0") + "---\n- not a recipe\n", "(document 2): expected a mapping"),
        (
            _linear("a", "$ft0") + "---\nmodels: [\n",
            "stages.yaml: expected the node content, but found '<stream end>' at line 6",
        ),
        (
            _linear("a", "$ft0") + "---\n" + _linear(None, "a").replace("linear", "linaer"),
            "(document 2): merge_method: unknown merge method 'linaer'; did you mean 'linear'?",
        ),
        (
            _linear("a", "$ft0").replace("linear", "slerp").replace("weight", "wieght")
            + "---\n"
            + _linear(None, "a"),
            "(document 1): models[0].parameters.wieght: merge method 'slerp' has no parameter "
            "'wieght'",
        ),
    ],
)
def test_bad_stage_structure_is_one_sentence_exit_2_nothing_written(
    pool, tmp_path, monkeypatch, capsys, text, fragment
):
    from test_bad_inputs import assert_one_sentence
    from test_bad_inputs import cli as run_cli

    recipe = _write(tmp_path, _filled(text, pool))
    code, err = run_cli(monkeypatch, capsys, "merge", str(recipe), str(tmp_path / "out"))
    assert_one_sentence(code, err, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages.yaml"]  # no output, no scratch


def test_a_one_document_recipe_is_one_unnamed_stage(tmp_path):
    recipe = _write(tmp_path, "merge_method: linear\nmodels: [{model: a}, {model: b}]\n")
    (stage,) = load_stages(recipe)
    assert stage.name is None and stage.recipe.merge_method == "linear"
    with pytest.raises(UserError, match="does not exist"):
        load_stages(tmp_path / "missing.yaml")
    (named,) = load_stages(_write(tmp_path, "name: x\n" + recipe.read_text(), "named.yaml"))
    assert named.name == "x" and named.recipe == stage.recipe  # mergekit-multi reads it so
