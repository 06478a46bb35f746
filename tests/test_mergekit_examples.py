"""Recipes of the forms mergekit ships (its `examples/*.yml`, its README and docs), run through
`evomerge merge` and through mergekit 0.1.5, compared tensor by tensor.

The recipes are written here, over tiny stand-in models (helpers/tiny_models.py: Llama and
Mistral, fp32 and bf16), one per form; the comment above each names the example or doc form it
stands for. They cover what tests/test_mergekit_golden.py (methods and their parameter forms),
tests/test_mergekit_vocab_golden.py (vocabularies), tests/test_depth.py (depth across
architectures), tests/test_adapters.py and tests/test_multistage.py do not: the examples' half
precision merges (`dtype: float16` over full-precision checkpoints), `int8_mask`, the `slices:`
form of a whole-model SLERP, overlapping passthrough ranges on Mistral, a base that is also
listed among the models, a `weight` left on slerp, LoRA adapters in a TIES merge, and the
multi-stage recipe of mergekit's docs. The checks are the golden test's ("exact", "topk",
"close", each with its reason); where the README names a departure, the case says which.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from click.testing import CliRunner
from test_mergekit_golden import Case, _load_folder, assert_same_tensors

from evomerge.cli import cli
from evomerge.merging.recipe import parse_recipe

pytestmark = pytest.mark.mergekit


def build_gpt2(folder):
    """A two-layer GPT-2 (as tests/test_depth.py builds it)."""
    from test_depth import build

    return build("gpt2", folder)


CASES = [
    # examples/linear.yml: a linear merge of three models without a base, weights that do not
    # sum to one (normalised by default), the arithmetic in float16 over fp32 checkpoints.
    Case(
        "linear_three_models_fp16",
        "llama-fp32",
        """
merge_method: linear
models:
  - model: $ft0
    parameters:
      weight: 1.0
  - model: $ft1
    parameters:
      weight: 0.3
  - model: $ft2
    parameters:
      weight: 0.5
dtype: float16
""",
    ),
    # examples/ties.yml: TIES with a density gradient, a weight gradient and a per-filter weight
    # with a fallback, normalize and int8_mask on, in float16. Half precision has many equal
    # magnitudes at the density boundary (the README's named TIES departure): "topk".
    Case(
        "ties_gradients_filter_int8_mask_fp16",
        "llama-fp32",
        """
models:
  - model: $ft0
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: $ft1
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: $ft2
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: $base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
        check="topk",
        boundary="top",
    ),
    # examples/bio-merge.yml: TIES of two Mistral fine-tunes over their base, which is not
    # listed among the models; normalize off, int8_mask on, float16 ("topk", as above).
    Case(
        "ties_mistral_no_normalize_int8_mask_fp16",
        "mistral-bf16",
        """
models:
  - model: $ft0
    parameters:
      density: 0.5
      weight: 0.5
  - model: $ft1
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: $base
parameters:
  normalize: false
  int8_mask: true
dtype: float16
""",
        check="topk",
        boundary="top",
    ),
    # examples/gradient-slerp.yml: a gradient SLERP of two whole models written as one slice
    # over all their layers, per-filter t lists and a fallback, in float16.
    Case(
        "slerp_slices_whole_model_filter_gradients_fp16",
        "llama-fp32",
        """
slices:
  - sources:
      - model: $ft0
        layer_range: [0, 4]
      - model: $ft1
        layer_range: [0, 4]
merge_method: slerp
base_model: $ft0
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float16
""",
    ),
    # examples/orcamini-platy-44layer.yml: passthrough layer stacking from two models with
    # overlapping ranges (a deeper model than either), in float16, on a Mistral stand-in.
    Case(
        "passthrough_overlapping_ranges_mistral_fp16",
        "mistral-bf16",
        """
slices:
  - sources:
    - model: $ft0
      layer_range: [0, 3]
  - sources:
    - model: $ft1
      layer_range: [1, 4]
merge_method: passthrough
dtype: float16
""",
    ),
    # examples/arcee_fusion.yml: the base also listed among the models, dtype bfloat16 and no
    # out_dtype. A named departure (README, "Where evomerge departs"): mergekit writes its
    # float32 intermediates; evomerge rounds to the merge dtype, the same numbers rounded.
    Case(
        "arcee_fusion_base_listed_dtype_bf16",
        "llama-fp32",
        """
models:
  - model: $ft0
  - model: $ft1
merge_method: arcee_fusion
base_model: $ft0
dtype: bfloat16
""",
    ),
    # A `weight` left in a recipe switched to slerp (the user recipes; mergekit's
    # gradient-slerp example with the models: syntax it mentions): ignored with a warning.
    Case(
        "slerp_weight_left_over_bf16",
        "llama-bf16",
        """
models:
  - model: $ft0
    parameters:
      weight: 0.7
  - model: $ft1
    parameters:
      weight: 0.3
merge_method: slerp
base_model: $ft0
parameters:
  t: 0.4
""",
    ),
    # mergekit's `model+lora` syntax (its README: a LoRA applied to its base as an input) in
    # a TIES merge beside a full fine-tune, with a density gradient.
    Case(
        "ties_lora_adapter_inputs",
        "llama-fp32",
        """
merge_method: ties
base_model: $base
models:
  - model: $base+$lora0
    parameters:
      density: [0.9, 0.5]
      weight: 0.6
  - model: $ft0
    parameters:
      density: 0.7
      weight: 0.4
""",
        check="topk",
        boundary="top",
    ),
    # docs/multimerge.md: a linear stage with a global weight, a slerp stage whose base is that
    # stage and whose models list only the other model, then a final DARE-TIES over the second
    # stage and a fine-tune. DARE's random mask cannot match mergekit's RNG (see the golden
    # test), so the final stage keeps density 1, its deterministic part.
    Case(
        "multimerge_linear_slerp_dare_ties",
        "llama-fp32",
        """
name: first-merge
merge_method: linear
models:
  - model: $ft0
  - model: $ft1
parameters:
  weight: 0.5
---
name: second-merge
merge_method: slerp
base_model: first-merge
models:
  - model: $ft2
parameters:
  t: 0.5
---
merge_method: dare_ties
base_model: $base
models:
  - model: second-merge
    parameters:
      density: 1.0
      weight: 0.5
  - model: $ft0
    parameters:
      density: 1.0
      weight: 0.5
""",
    ),
]

# --- the configs mergekit's own tests build (tests/test_basic_merges.py) -------------------
CASES += [
    # Their two-model form gives every method `weight: 0.6` / `0.4` and dtype bfloat16, also
    # methods that take no weight (ignored with a warning): model_stock with the base not
    # listed, karcher given a base_model, nearswap with the base listed, sce with select_topk.
    Case(
        "model_stock_weights_left_over_bf16",
        "llama-fp32",
        """
merge_method: model_stock
base_model: $base
models:
  - model: $ft0
    parameters: {weight: 0.6}
  - model: $ft1
    parameters: {weight: 0.4}
dtype: bfloat16
""",
    ),
    Case(
        "karcher_given_a_base_weights_left_over_bf16",
        "llama-fp32",
        """
merge_method: karcher
base_model: $base
models:
  - model: $ft0
    parameters: {weight: 0.6}
  - model: $ft1
    parameters: {weight: 0.4}
parameters: {max_iter: 5, tol: 1.0e-5}
dtype: bfloat16
""",
    ),
    Case(
        "nearswap_base_listed_weights_left_over_bf16",
        "llama-fp32",
        """
merge_method: nearswap
base_model: $ft0
models:
  - model: $ft0
    parameters: {weight: 0.6}
  - model: $ft1
    parameters: {weight: 0.4}
parameters: {t: 0.0001}
dtype: bfloat16
""",
    ),
    Case(
        "sce_weights_left_over_bf16",
        "llama-fp32",
        """
merge_method: sce
base_model: $base
models:
  - model: $ft0
    parameters: {weight: 0.6}
  - model: $ft1
    parameters: {weight: 0.4}
parameters: {select_topk: 0.5}
dtype: bfloat16
""",
    ),
    # nuslerp over a base with weights that sum to zero (their edge case).
    Case(
        "nuslerp_weights_sum_to_zero",
        "llama-fp32",
        """
merge_method: nuslerp
base_model: $base
models:
  - model: $ft0
    parameters: {weight: -0.5}
  - model: $ft1
    parameters: {weight: 0.5}
parameters: {nuslerp_row_wise: false, nuslerp_flatten: false}
dtype: bfloat16
""",
    ),
    # passthrough of one whole model with a per-filter scale (models: form, o_proj zeroed).
    Case(
        "passthrough_models_form_scale_filter",
        "llama-fp32",
        """
merge_method: passthrough
models:
  - model: $ft0
    parameters:
      scale:
        - filter: o_proj
          value: 0
        - value: 1
""",
    ),
    # Granite (Llama's layout, its own config scalars): a copy in bfloat16 and a SLERP.
    Case(
        "passthrough_copy_granite_bf16",
        "granite-fp32",
        """
merge_method: passthrough
models:
  - model: $ft0
dtype: bfloat16
""",
    ),
    Case(
        "slerp_granite_base_listed_bf16",
        "granite-fp32",
        """
merge_method: slerp
base_model: $ft0
models:
  - model: $ft0
  - model: $ft1
parameters: {t: 0.5}
dtype: bfloat16
""",
    ),
    # GPT-2 stacked on itself, all its layers twice (their gpt2 stack: 12 -> 24 layers).
    Case(
        "passthrough_gpt2_stacked_twice_bf16",
        "gpt2",
        """
merge_method: passthrough
slices:
  - sources:
      - model: $ft0
        layer_range: [0, 2]
  - sources:
      - model: $ft0
        layer_range: [0, 2]
dtype: bfloat16
""",
    ),
]

# Case id -> the dtype mergekit writes where the README names why evomerge writes another.
DEPARTURES = {"arcee_fusion_base_listed_dtype_bf16": torch.float32}
MULTI = {"multimerge_linear_slerp_dare_ties"}
# Cases whose output is, by design, an input's tensors (in another dtype at most).
COPIES = {"passthrough_copy_granite_bf16", "passthrough_gpt2_stacked_twice_bf16"}


def _layers(config: dict) -> int:
    return next(config[key] for key in ("num_hidden_layers", "n_layer") if key in config)


@pytest.fixture(scope="module")
def examples(tmp_path_factory, mergekit_python):
    """Every case merged by `evomerge merge` and, in one process, by mergekit 0.1.5."""
    from helpers.mergekit_env import fill_in_paths, run_driver
    from helpers.tiny_models import build_tiny_pool, write_adapter

    root = tmp_path_factory.mktemp("examples")
    torch.set_num_threads(1)
    pools = {}
    for arch in ("Llama", "Mistral", "Granite"):
        for label, dtype, seed in (("fp32", torch.float32, 5), ("bf16", torch.bfloat16, 6)):
            name = f"{arch.lower()}-{label}"
            if any(case.pool == name for case in CASES):
                pools[name] = build_tiny_pool(
                    root / name, dtype=dtype, seed=seed, architecture=arch
                )
    pools["gpt2"] = {"ft0": build_gpt2(root / "gpt2")}
    llama = pools["llama-fp32"]
    llama["lora0"] = write_adapter(root / "lora0", llama["base"], seed=3)

    runner = CliRunner()
    jobs = {"threads": 1, "merges": [], "multi": []}
    outputs, logs = {}, {}
    for case in CASES:
        text = fill_in_paths(case.recipe, pools[case.pool])
        recipe = root / f"{case.id}.yaml"
        recipe.write_text(text)
        evo_out, mk_out = root / "evo" / case.id, root / "mk" / case.id
        result = runner.invoke(cli, ["merge", str(recipe), str(evo_out), "--seed", "0"])
        assert result.exit_code == 0, (case.id, result.output, result.exception)
        logs[case.id] = result.output
        job = {"name": case.id, "recipe": text, "out": str(mk_out), "seed": 0}
        job["lora_cache"] = str(root / "lora-cache")
        if case.id in MULTI:
            jobs["multi"].append({**job, "intermediate_dir": str(root / "mk-stages" / case.id)})
        else:
            jobs["merges"].append(job)
        outputs[case.id] = (evo_out, mk_out)
    results = run_driver(mergekit_python, jobs)
    return {cid: (*outputs[cid], results[cid]) for cid in outputs}, pools


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_example_form_matches_mergekit(case: Case, examples):
    runs, pools = examples
    evo_dir, mk_dir, mk_result = runs[case.id]
    assert mk_result["ok"], f"mergekit refused the recipe: {mk_result.get('traceback')}"
    ours, theirs = _load_folder(evo_dir), _load_folder(mk_dir)
    evo_config = json.loads((evo_dir / "config.json").read_text())
    mk_config = json.loads((mk_dir / "config.json").read_text())
    assert _layers(evo_config) == _layers(mk_config)
    assert evo_config["architectures"] == mk_config["architectures"]
    if case.id in DEPARTURES:
        # mergekit's dtype differs as the README says; its numbers, rounded, are evomerge's.
        assert {t.dtype for t in theirs.values()} == {DEPARTURES[case.id]}
        theirs = {name: t.to(ours[name].dtype) for name, t in theirs.items()}
    inexact = assert_same_tensors(case, ours, theirs, pools[case.pool])
    print(f"{case.id}: {inexact} elements within the '{case.check}' allowance")
    ft0 = _load_folder(pools[case.pool]["ft0"])
    changed = any(not torch.equal(ours[n], ft0[n].to(ours[n].dtype)) for n in ours if n in ft0)
    assert changed != (case.id in COPIES)  # a merge is none of its inputs; a copy is one


@pytest.mark.parametrize(
    "case_id, layers, architecture",
    [
        # orcamini-platy: 3 + 3 layers of 4-layer models make 6 (mergekit's 44 of 40)
        ("passthrough_overlapping_ranges_mistral_fp16", 6, "MistralForCausalLM"),
        # their gpt2 stack: GPT-2 keeps its depth under `n_layer`
        ("passthrough_gpt2_stacked_twice_bf16", 4, "GPT2LMHeadModel"),
    ],
)
def test_stacking_makes_a_deeper_model(examples, case_id, layers, architecture):
    runs, _ = examples
    evo_dir, mk_dir, _ = runs[case_id]
    for folder in (evo_dir, mk_dir):
        config = json.loads((folder / "config.json").read_text())
        assert _layers(config) == layers
        assert config["architectures"] == [architecture]


def test_a_weight_left_on_slerp_is_ignored_with_a_warning(examples, caplog):
    runs, pools = examples
    case = next(c for c in CASES if c.id == "slerp_weight_left_over_bf16")
    from helpers.mergekit_env import fill_in_paths

    with caplog.at_level(logging.WARNING):
        parse_recipe(fill_in_paths(case.recipe, pools[case.pool]))
    warnings = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert all("'slerp' takes no 'weight'" in w for w in warnings)


def test_every_example_form_is_a_recipe_evomerge_reads():
    """The cases parse without the models (a cheap check that runs without mergekit too)."""
    for case in CASES:
        if case.id not in MULTI:
            assert parse_recipe(case.recipe.replace("$", "")).merge_method
