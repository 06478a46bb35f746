"""Golden comparisons with mergekit 0.1.5: the same recipe, merged by both, gives the same tensors.

Tiny GQA Llama pools (fp32 and bf16) are built once; every case is merged in-process by
`evomerge.merging.executor.run_merge` and, all in one subprocess, by mergekit's own `run_merge` in
its own environment (see helpers/mergekit_env.py). Both sides run with one torch thread so that
reductions are summed in one order.

Checks, from strict to loose, each chosen per case with the reason beside it:
  exact     — bit-identical tensors: we follow mergekit's arithmetic operation for operation.
  topk      — magnitude selection: bit-identical except where a model's |delta| equals the
              value at its selection boundary (mergekit's unstable argsort keeps an arbitrary
              subset of equal magnitudes; evomerge keeps the lowest indices).
  close     — a stated relative tolerance, for a stated numerical reason.
Randomised methods (dare_*, della*) cannot match mergekit's RNG stream by design (see
merge-semantics.md, "Randomness"); their deterministic parts are compared at density 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.merging.executor import run_merge
from evomerge.merging.plan import plan_merge
from evomerge.merging.recipe import parse_recipe

pytestmark = pytest.mark.mergekit


@dataclass(frozen=True)
class Case:
    id: str
    pool: str  # "fp32" or "bf16": the dtype the pool's checkpoints are stored in
    recipe: str  # YAML with $base, $ft0.. standing for model folders
    check: str = "exact"  # "exact" | "topk" | "close"
    rtol: float = 0.0
    atol: float = 0.0
    # For "topk": which magnitude boundaries to excuse ("top" for TIES, "band" for breadcrumbs).
    boundary: str | None = None


CASES = [
    # --- linear: fp32 accumulation in both, so bit-identical --------------------------------
    Case(
        "linear_fp32_gradients_filters",
        "fp32",
        """
merge_method: linear
models:
  - model: $ft0
    parameters:
      weight:
        - filter: self_attn
          value: [0.2, 0.8, 0.5]
        - value: 0.7
  - model: $ft1
    parameters: {weight: [1.0, 0.3]}
  - model: $ft2
    parameters: {weight: 0.5}
""",
    ),
    Case(
        "linear_bf16_no_normalize_out_fp32",
        "bf16",
        """
merge_method: linear
parameters: {normalize: false}
out_dtype: float32
models:
  - model: $ft0
    parameters: {weight: 0.3}
  - model: $ft1
    parameters: {weight: [0.7, 0.1]}
""",
    ),
    # --- slerp -------------------------------------------------------------------------------
    Case(
        "slerp_fp32_filter_gradients",
        "fp32",
        """
merge_method: slerp
base_model: $base
models:
  - model: $base
  - model: $ft0
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
""",
    ),
    Case(
        "slerp_bf16_dtype_fp32_out_bf16",
        "bf16",
        """
merge_method: slerp
base_model: $ft1
dtype: float32
out_dtype: bfloat16
models:
  - model: $ft1
  - model: $ft2
parameters:
  t: [0.1, 0.9]
""",
    ),
    Case(
        "slerp_bf16",
        "bf16",
        """
merge_method: slerp
base_model: $base
models:
  - model: $base
  - model: $ft0
parameters: {t: 0.35}
""",
    ),
    # --- nuslerp / multislerp / karcher ------------------------------------------------------
    Case(
        "nuslerp_fp32_with_base",
        "fp32",
        """
merge_method: nuslerp
base_model: $base
models:
  - model: $ft0
    parameters: {weight: [0.3, 0.8]}
  - model: $ft1
    parameters: {weight: 0.6}
""",
    ),
    Case(
        "nuslerp_fp32_row_wise_no_base",
        "fp32",
        """
merge_method: nuslerp
parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}
models:
  - model: $ft0
    parameters: {weight: 0.4}
  - model: $ft1
    parameters: {weight: 0.6}
""",
    ),
    Case(
        "nuslerp_bf16_column_wise",
        "bf16",
        """
merge_method: nuslerp
parameters: {nuslerp_flatten: false}
models:
  - model: $ft0
    parameters: {weight: 1.0}
  - model: $ft2
    parameters: {weight: 0.5}
""",
    ),
    Case(
        "multislerp_fp32_with_base",
        "fp32",
        """
merge_method: multislerp
base_model: $base
models:
  - model: $ft0
    parameters: {weight: 0.5}
  - model: $ft1
    parameters: {weight: [0.2, 0.9]}
  - model: $ft2
    parameters: {weight: 0.3}
""",
    ),
    Case(
        "multislerp_bf16_no_base",
        "bf16",
        """
merge_method: multislerp
models:
  - model: $ft0
    parameters: {weight: 1.0}
  - model: $ft1
    parameters: {weight: 2.0}
""",
    ),
    Case(
        "karcher_fp32",
        "fp32",
        """
merge_method: karcher
models:
  - model: $ft0
  - model: $ft1
  - model: $ft2
parameters: {max_iter: 20, tol: 1.0e-6}
""",
    ),
    Case(
        "karcher_bf16",
        "bf16",
        """
merge_method: karcher
models:
  - model: $ft0
  - model: $ft1
""",
    ),
    # --- task-vector family ------------------------------------------------------------------
    Case(
        "task_arithmetic_fp32_lambda_gradients",
        "fp32",
        """
merge_method: task_arithmetic
base_model: $base
parameters:
  lambda: 0.8
  normalize: true
models:
  - model: $ft0
    parameters: {weight: [0.2, 1.0]}
  - model: $ft1
    parameters:
      weight:
        - filter: mlp
          value: -0.3
        - value: 0.6
""",
    ),
    Case(
        "task_arithmetic_bf16",
        "bf16",
        """
merge_method: task_arithmetic
base_model: $base
models:
  - model: $ft0
    parameters: {weight: 0.3}
  - model: $ft1
    parameters: {weight: 0.7}
""",
    ),
    Case(
        "ties_fp32_gradients_filters",
        "fp32",
        """
merge_method: ties
base_model: $base
parameters:
  normalize: true
  int8_mask: true
  density:
    - filter: self_attn
      value: [0.2, 0.9]
    - value: 0.5
models:
  - model: $base
  - model: $ft0
    parameters: {weight: [1.0, 0.4, 0.8]}
  - model: $ft1
    parameters:
      weight: 0.5
      density: 0.3
  - model: $ft2
    parameters:
      weight:
        - filter: mlp
          value: -0.2
        - value: 0.6
""",
        # fp32 deltas of random fine-tunes have (almost) no equal magnitudes, but excuse any.
        check="topk",
        boundary="top",
    ),
    Case(
        "ties_bf16_lambda",
        "bf16",
        """
merge_method: ties
base_model: $base
parameters: {lambda: 1.2, density: 0.4}
models:
  - model: $ft0
    parameters: {weight: 0.3}
  - model: $ft1
    parameters: {weight: 0.7}
""",
        # bf16 deltas have only 8 significant bits: many equal |delta| at the top-k boundary.
        check="topk",
        boundary="top",
    ),
    Case(
        "ties_fp32_rescale",
        "fp32",
        """
merge_method: ties
base_model: $base
parameters: {rescale: true, density: 0.3}
models:
  - model: $ft0
    parameters: {weight: 0.5}
  - model: $ft1
    parameters: {weight: 0.5}
""",
        # evomerge's L1 rescale sums |delta| exactly (fixed point, order-free) where mergekit
        # sums in fp32: the scale factor differs in its last bits, so a few ulps in the delta.
        # Weights here are O(0.02-0.2), so atol 1e-7 is a few fp32 ulps of the output.
        check="close",
        rtol=1e-6,
        atol=1e-7,
    ),
    Case(
        "breadcrumbs_fp32",
        "fp32",
        """
merge_method: breadcrumbs
base_model: $base
parameters: {density: 0.5, gamma: 0.05}
models:
  - model: $ft0
    parameters: {weight: 0.6}
  - model: $ft1
    parameters: {weight: 0.4, density: [0.3, 0.8]}
""",
        check="topk",
        boundary="band",
    ),
    Case(
        "breadcrumbs_ties_bf16",
        "bf16",
        """
merge_method: breadcrumbs_ties
base_model: $base
parameters: {density: 0.5, normalize: true}
models:
  - model: $ft0
    parameters: {weight: 0.6, gamma: 0.02}
  - model: $ft1
    parameters: {weight: 0.4}
""",
        check="topk",
        boundary="band",
    ),
    # Random sparsifiers at density 1 drop nothing: what remains is their deterministic
    # weighting, sign election and normalisation, which must match exactly.
    Case(
        "dare_ties_density1_fp32",
        "fp32",
        """
merge_method: dare_ties
base_model: $base
models:
  - model: $ft0
    parameters: {weight: 0.6}
  - model: $ft1
    parameters: {weight: [0.2, 0.9]}
""",
    ),
    Case(
        "dare_linear_density1_bf16",
        "bf16",
        """
merge_method: dare_linear
base_model: $base
parameters: {normalize: true}
models:
  - model: $ft0
    parameters: {weight: 0.6}
  - model: $ft1
    parameters: {weight: 0.3}
""",
    ),
    Case(
        "della_density1_fp32",
        "fp32",
        """
merge_method: della
base_model: $base
parameters: {lambda: 0.9, density: 1.0}
models:
  - model: $ft0
    parameters: {weight: 0.6}
  - model: $ft2
    parameters: {weight: 0.3}
""",
    ),
    Case(
        "della_linear_density1_bf16",
        "bf16",
        """
merge_method: della_linear
base_model: $base
models:
  - model: $ft0
    parameters: {weight: 0.6}
  - model: $ft1
    parameters: {weight: 0.3}
""",
    ),
    Case(
        "sce_fp32_topk",
        "fp32",
        """
merge_method: sce
base_model: $base
parameters: {select_topk: 0.5}
models:
  - model: $ft0
  - model: $ft1
  - model: $ft2
""",
    ),
    Case(
        "sce_bf16",
        "bf16",
        """
merge_method: sce
base_model: $base
models:
  - model: $ft0
  - model: $ft1
""",
    ),
    Case(
        "model_stock_fp32",
        "fp32",
        """
merge_method: model_stock
base_model: $base
models:
  - model: $ft0
  - model: $ft1
  - model: $ft2
""",
    ),
    Case(
        "model_stock_bf16_filter_wise",
        "bf16",
        """
merge_method: model_stock
base_model: $base
parameters: {filter_wise: true}
models:
  - model: $ft0
  - model: $ft1
""",
    ),
    # --- nearswap / arcee_fusion / ram / ramplus_tl ------------------------------------------
    # arcee_fusion and ramplus_tl promote 16-bit inputs to float32 (a float32 mask, a float32
    # lambda), and mergekit 0.1.5 then writes float32 unless out_dtype is given; evomerge
    # rounds to the merge dtype. Their 16-bit cases name out_dtype, so both round the same
    # float32 values once.
    Case(
        "nearswap_fp32_gradients_filters",
        "fp32",
        """
merge_method: nearswap
base_model: $base
models:
  - model: $ft0
parameters:
  t:
    - filter: self_attn
      value: [0.0, 0.01, 0.05]
    - filter: mlp
      value: 0.002
    - value: 0.0
""",
    ),
    Case(
        "nearswap_bf16",
        "bf16",
        """
merge_method: nearswap
base_model: $ft1
models:
  - model: $ft2
parameters: {t: 0.01}
""",
    ),
    Case(
        "arcee_fusion_fp32",
        "fp32",
        """
merge_method: arcee_fusion
base_model: $base
models:
  - model: $base
  - model: $ft0
""",
    ),
    Case(
        "arcee_fusion_bf16",
        "bf16",
        """
merge_method: arcee_fusion
base_model: $ft0
out_dtype: bfloat16
models:
  - model: $ft1
""",
    ),
    Case(
        "ram_fp32",
        "fp32",
        """
merge_method: ram
base_model: $base
models:
  - model: $ft0
  - model: $ft1
  - model: $ft2
""",
    ),
    Case(
        "ram_bf16_epsilon_gradient",
        "bf16",
        """
merge_method: ram
base_model: $base
parameters:
  epsilon:
    - filter: mlp
      value: [0.0, 0.02]
    - value: 0.01
models:
  - model: $ft0
  - model: $ft1
""",
    ),
    Case(
        "ramplus_tl_fp32",
        "fp32",
        """
merge_method: ramplus_tl
base_model: $base
models:
  - model: $ft0
  - model: $ft1
  - model: $ft2
""",
    ),
    Case(
        "ramplus_tl_fp32_gradients_filters",
        "fp32",
        """
merge_method: ramplus_tl
base_model: $base
parameters:
  r: [0.1, 0.9]
  alpha:
    - filter: self_attn
      value: 2.0
    - value: 0.05
  epsilon: 0.01
models:
  - model: $ft0
  - model: $ft1
""",
    ),
    Case(
        "ramplus_tl_bf16_out_bf16",
        "bf16",
        """
merge_method: ramplus_tl
base_model: $base
out_dtype: bfloat16
parameters: {r: 0.5, alpha: 1.0}
models:
  - model: $ft0
  - model: $ft1
  - model: $ft2
""",
    ),
    Case(
        "ramplus_tl_fp32_dtype_bf16_out_fp32",
        "fp32",
        """
merge_method: ramplus_tl
base_model: $base
dtype: bfloat16
out_dtype: float32
models:
  - model: $ft0
  - model: $ft1
""",
        # mergekit writes its float32 sum of the bf16 inputs; evomerge rounds it to the merge
        # dtype (bf16) first: at most half a bf16 ulp apart.
        check="close",
        rtol=2.0**-8,
    ),
    # --- slices ------------------------------------------------------------------------------
    Case(
        "passthrough_stack_fp32",
        "fp32",
        """
merge_method: passthrough
slices:
  - sources:
      - model: $ft0
        layer_range: [0, 3]
  - sources:
      - model: $ft1
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - filter: down_proj
              value: [1.0, 0.0]
            - value: 1.0
""",
    ),
    Case(
        "passthrough_stack_bf16_out_fp32",
        "bf16",
        """
merge_method: passthrough
out_dtype: float32
slices:
  - sources:
      - model: $ft2
        layer_range: [0, 2]
  - sources:
      - model: $ft0
        layer_range: [2, 4]
  - sources:
      - model: $ft1
        layer_range: [1, 3]
""",
    ),
    Case(
        "slerp_slices_per_slice_t_fp32",
        "fp32",
        """
merge_method: slerp
base_model: $ft0
parameters: {t: 0.5}
slices:
  - sources:
      - model: $ft0
        layer_range: [0, 2]
      - model: $ft1
        layer_range: [0, 2]
    parameters: {t: 0.2}
  - sources:
      - model: $ft0
        layer_range: [2, 4]
      - model: $ft1
        layer_range: [2, 4]
    parameters:
      t:
        - filter: self_attn
          value: [0.3, 0.9]
""",
    ),
    Case(
        "ties_slices_per_source_and_slice_fp32",
        "fp32",
        """
merge_method: ties
base_model: $base
parameters: {density: 0.7, weight: 0.1}
slices:
  - sources:
      - model: $base
        layer_range: [0, 3]
      - model: $ft0
        layer_range: [0, 3]
        parameters: {weight: [0.9, 0.1]}
      - model: $ft1
        layer_range: [1, 4]
    parameters: {density: [0.3, 0.6], weight: 0.5}
  - sources:
      - model: $base
        layer_range: [3, 4]
      - model: $ft0
        layer_range: [3, 4]
      - model: $ft1
        layer_range: [3, 4]
        parameters: {density: 0.9}
""",
        check="topk",
        boundary="top",
    ),
    Case(
        "linear_fp32_dtype_bf16",
        "fp32",
        """
merge_method: linear
dtype: bfloat16
models:
  - model: $ft0
    parameters: {weight: 0.25}
  - model: $ft1
    parameters: {weight: 0.75}
""",
    ),
    Case(
        "task_arithmetic_fp32_dtype_bf16_out_fp16",
        "fp32",
        """
merge_method: task_arithmetic
base_model: $base
dtype: bfloat16
out_dtype: float16
models:
  - model: $ft0
    parameters: {weight: 0.3}
  - model: $ft1
    parameters: {weight: 0.3}
""",
    ),
]


# --- building and running everything once per session ---------------------------------------
def _recipe_text(case: Case, pool: dict[str, Path]) -> str:
    from helpers.mergekit_env import fill_in_paths

    return fill_in_paths(case.recipe, pool)


@pytest.fixture(scope="session")
def golden(tmp_path_factory, mergekit_python):
    """Both merges of every case: {case id: (evomerge folder, mergekit folder, mergekit result)}."""
    from helpers.mergekit_env import run_driver
    from helpers.tiny_models import build_tiny_pool

    root = tmp_path_factory.mktemp("golden")
    torch.set_num_threads(1)
    pools = {
        "fp32": build_tiny_pool(root / "pool-fp32", dtype=torch.float32, seed=1),
        "bf16": build_tiny_pool(root / "pool-bf16", dtype=torch.bfloat16, seed=2),
    }
    jobs, outputs = [], {}
    for case in CASES:
        text = _recipe_text(case, pools[case.pool])
        evo_out, mk_out = root / "evo" / case.id, root / "mk" / case.id
        run_merge(parse_recipe(text), evo_out, seed=0)
        jobs.append({"name": case.id, "recipe": text, "out": str(mk_out), "seed": 0})
        outputs[case.id] = (evo_out, mk_out)
    results = run_driver(mergekit_python, {"threads": 1, "merges": jobs})
    return {cid: (*outputs[cid], results[cid]) for cid in outputs}, pools


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _merge_dtype(case: Case) -> torch.dtype:
    recipe = parse_recipe(case.recipe.replace("$", ""))
    if recipe.dtype:
        return getattr(torch, recipe.dtype)
    return torch.float32 if case.pool == "fp32" else torch.bfloat16


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_mergekit(case: Case, golden):
    runs, pools = golden
    evo_dir, mk_dir, mk_result = runs[case.id]
    assert mk_result["ok"], f"mergekit refused the recipe: {mk_result.get('traceback')}"
    ours, theirs = _load_folder(evo_dir), _load_folder(mk_dir)
    mk_config = json.loads((mk_dir / "config.json").read_text())
    evo_config = json.loads((evo_dir / "config.json").read_text())
    assert evo_config["num_hidden_layers"] == mk_config["num_hidden_layers"]
    inexact = assert_same_tensors(case, ours, theirs, pools[case.pool])
    print(f"{case.id}: {inexact} elements within the '{case.check}' allowance")
    # The merge did something: the output is none of its inputs.
    ft0 = _load_folder(pools[case.pool]["ft0"])
    assert any(not torch.equal(ours[n], ft0[n].to(ours[n].dtype)) for n in ours if n in ft0)


def assert_same_tensors(case: Case, ours: dict, theirs: dict, pool: dict[str, Path]) -> int:
    """Every tensor of evomerge's output equals mergekit's under the case's check (the same
    names, dtypes and shapes); returns how many elements the check's allowance excused."""
    assert sorted(ours) == sorted(theirs)
    failures, inexact = [], 0
    for name in sorted(ours):
        a, b = ours[name], theirs[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if torch.equal(a, b):
            continue
        inexact += int((a != b).sum())
        if case.check == "close":
            close = torch.isclose(a.double(), b.double(), rtol=case.rtol, atol=case.atol)
            if bool(close.all()):
                continue
        elif case.check == "topk":
            unexplained = (a != b) & ~_tied_at_boundary(case, pool, name)
            if not bool(unexplained.any()):
                continue
        diff = (a.double() - b.double()).abs()
        failures.append(
            f"{name}: {int((a != b).sum())}/{a.numel()} differ, max |diff| {diff.max():.3g}"
        )
    assert not failures, "\n".join(failures)
    return inexact


def _tied_at_boundary(case: Case, pool: dict[str, Path], name: str) -> torch.Tensor:
    """Where some input's |delta| equals the magnitude at its selection boundary, so that which
    of the equal magnitudes is kept is arbitrary (mergekit's argsort is not stable).

    The boundary is recomputed from the density and gamma evomerge's planner resolved for this
    tensor and model, so a wrongly resolved parameter still fails the comparison.
    """
    plan = plan_merge(parse_recipe(_recipe_text(case, pool)))
    job = next(j for j in plan.jobs if j.out_name == name)
    dtype = _merge_dtype(case)

    def load(ref):
        return plan.checkpoints[ref.model].tensor(ref.name).to(dtype)

    base = load(job.base)
    excused = torch.zeros(base.shape, dtype=torch.bool)
    for i, ref in enumerate(job.inputs):
        magnitude = (load(ref) - base).abs().float().flatten()
        n, density = magnitude.numel(), job.kwargs["density"][i]
        if density >= 1 or density <= 0:
            continue  # nothing is selected, nothing is arbitrary
        ascending = torch.sort(magnitude).values
        if case.boundary == "top":  # keep the k largest
            k = max(1, int(density * n))
            edges = [ascending[n - k]]
        else:  # breadcrumbs: keep ascending ranks [bottom, bottom + keep)
            keep = int(density * n)
            bottom = max(0, n - keep - int(job.kwargs["gamma"][i] * n))
            edges = [ascending[j] for j in (bottom, bottom + keep - 1) if 0 <= j < n]
        for edge in edges:
            excused |= (magnitude == edge).view(base.shape)
    return excused


def test_every_deterministic_method_is_covered():
    from evomerge.methods import method_names
    from evomerge.methods.registry import registered_methods

    covered = {parse_recipe(c.recipe.replace("$", "")).merge_method for c in CASES}
    evomerge_only = {m.name for m in registered_methods() if not m.mergekit}
    assert set(method_names()) - evomerge_only <= covered, set(method_names()) - covered
