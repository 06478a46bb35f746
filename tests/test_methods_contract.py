"""Contracts every registered merge method keeps, plus properties of gradient settings.

The method contracts are parametrised over `method_names()`, so a newly registered method is
tested without touching this file:
  - equal inputs give that input;
  - one-hot weights give that model (for methods that weight models; slerp's t in {0, 1});
  - the dtype (fp32, bf16, fp16) and shape of the inputs are kept.
"Give" is exact where the arithmetic is exact (copies, base + 0) and otherwise within a few
units in the last place of the dtype: e.g. linear computes 0.3 x + 0.7 x in fp32, SLERP goes
through sin/acos, so the result is x only up to rounding.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

from evomerge.merging.recipe import parse_recipe, resolve_setting
from evomerge.methods import MergeInputs, get_method, method_names
from evomerge.methods.random_fields import UniformField

METHODS = method_names()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(24,), (12, 8), (4, 6, 5)]


# --- helpers -------------------------------------------------------------------------------
def _model_count(method) -> int:
    n = max(method.min_models, 3)
    return min(n, method.max_models) if method.max_models else n


def _kwargs(method, n: int, *, weights=None, density: float = 1.0, t: float = 0.5) -> dict:
    """Parameters for `n` models: declared defaults, plus values for the required ones."""
    weights = weights if weights is not None else [1.0 / n] * n
    by_role = {"weight": list(weights), "density": [density] * n, "interpolation": t}
    kwargs = {}
    for param in method.params:
        key = "lambda_" if param.name == "lambda" else param.name
        if param.role in by_role:
            value = by_role[param.role]
        elif param.name == "t":  # nearswap's distance, which has no role: above every |a - b|
            value = t
        elif param.required:
            raise AssertionError(f"{method.name}: no test value for required {param.name!r}")
        else:
            value = [param.default] * n if param.per_model else param.default
        kwargs[key] = value
    return kwargs


def _density(method) -> float:
    """0.5 where the method keeps a fraction of each task vector (so that it drops some), else 1."""
    return 0.5 if any(p.role == "density" for p in method.params) else 1.0


def _bases(method) -> list[bool]:
    """With a base, without, or both (optional-base methods are tested both ways)."""
    return {"required": [True], "input": [False], "optional": [False, True]}[method.base_role]


def _merge(method, models, base, kwargs, name="model.layers.0.mlp.up_proj.weight"):
    field = UniformField(1234, name) if method.randomized else None
    inputs = MergeInputs(models=list(models), base=base, tensor_name=name, field=field)
    with torch.no_grad():
        return method.merge(inputs, **kwargs)


def _random(shape, dtype, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


def _assert_near(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 4) -> None:
    """Equal up to `ulps` units in the last place of the dtype, relative to the tensor's scale
    (so that near-zero elements are not held to an absolute precision they never had)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    eps = torch.finfo(expected.dtype).eps
    scale = expected.abs().max().double().item()
    diff = (actual.double() - expected.double()).abs().max().item()
    assert diff <= ulps * eps * max(scale, 1e-30), (
        f"max |diff| {diff:.3g} > {ulps} ulp of {scale:.3g}"
    )


# --- method contracts ----------------------------------------------------------------------
def _cases():
    for name in METHODS:
        method = get_method(name)
        for with_base in _bases(method):
            yield pytest.param(name, with_base, id=f"{name}-{'base' if with_base else 'nobase'}")


@pytest.mark.parametrize("name, with_base", list(_cases()))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_equal_inputs_give_that_input(name, with_base, dtype):
    method = get_method(name)
    n = _model_count(method)
    if name == "multislerp" and with_base and n > 2:
        # All task vectors are zero: no mean direction exists, and mergekit 0.1.5 raises for
        # more than two models as well. Two models fall back to linear interpolation.
        n = 2
        if dtype == torch.float16:
            pytest.xfail(
                "multislerp divides by (norm + eps) in the input dtype, as mergekit 0.1.5 does; "
                "eps=1e-8 underflows to 0 in fp16, so all-zero task vectors give 0/0 = nan"
            )
    x = _random((12, 8), dtype, seed=0)
    density = _density(method)
    kwargs = _kwargs(method, n, weights=[0.3, 0.7, 0.5][:n], density=density)
    out = _merge(method, [x.clone() for _ in range(n)], x.clone() if with_base else None, kwargs)
    if (method.base_role == "required" or with_base) and name != "slerp":
        # Methods over task vectors: every delta is exactly 0, so the result is base + 0.
        assert torch.equal(out, x)
    else:
        _assert_near(out, x)


@pytest.mark.parametrize(
    "name",
    [
        m
        for m in METHODS
        if any(p.role in ("weight", "interpolation") for p in get_method(m).params)
    ],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_one_hot_weights_give_that_model(name, dtype):
    method = get_method(name)
    n = _model_count(method)
    models = [_random((12, 8), dtype, seed=10 + i) for i in range(n)]
    base = _random((12, 8), dtype, seed=99) if method.base_role != "input" else None
    if name == "slerp":  # t = 0 is the base, t = 1 the other model
        _assert_near(_merge(method, models, base, _kwargs(method, 1, t=0.0)), base)
        _assert_near(_merge(method, models, base, _kwargs(method, 1, t=1.0)), models[0])
        return
    if name == "multislerp" and dtype == torch.float16:
        pytest.xfail(
            "multislerp's exponential map divides by (|tangent| + eps) in the input dtype, as "
            "mergekit 0.1.5 does; with one-hot weights |tangent| = 0 and eps=1e-8 underflows "
            "in fp16, so sin(0)/0 = nan"
        )
    for k in range(n):
        weights = [1.0 if i == k else 0.0 for i in range(n)]
        out = _merge(method, models, base, _kwargs(method, n, weights=weights))
        if name == "linear":  # 0 * a + 1 * b + 0 * c is exact in fp32
            assert torch.equal(out, models[k])
        else:
            # base + (model - base) rounds twice; SLERP variants go through sin/cos.
            _assert_near(out, models[k], ulps=8)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dtype_and_shape_are_kept(name, dtype, shape):
    method = get_method(name)
    n = _model_count(method)
    models = [_random(shape, dtype, seed=20 + i) for i in range(n)]
    base = _random(shape, dtype, seed=98) if method.base_role != "input" else None
    density = _density(method)
    out = _merge(
        method, models, base, _kwargs(method, n, weights=[0.5, 0.3, 0.2][:n], density=density)
    )
    assert out.dtype == dtype
    assert out.shape == torch.Size(shape)
    assert out.device == models[0].device
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("resident", [False, True], ids=["one-shot", "resident"])
def test_the_executor_gives_the_methods_bits(name, dtype, resident):
    """The merge executor runs a fused kernel where one takes the merge, else the method: the
    method's torch code is the reference either way, bit for bit."""
    from evomerge.merging.executor import PreparedTensor

    method = get_method(name)
    n = _model_count(method)
    models = [_random((12, 8), dtype, seed=30 + i) for i in range(n)]
    base = _random((12, 8), dtype, seed=97) if method.base_role != "input" else None
    density = _density(method)
    kwargs = _kwargs(method, n, weights=[0.5, 0.3, 0.2][:n], density=density)
    expected = _merge(method, models, base, kwargs)
    field = UniformField(1234, "model.layers.0.mlp.up_proj.weight") if method.randomized else None
    inputs = MergeInputs(
        models=list(models), base=base, tensor_name="model.layers.0.mlp.up_proj.weight", field=field
    )
    got, finite = PreparedTensor(method, inputs, resident=resident).run(kwargs)
    assert got.dtype == expected.dtype and torch.equal(
        got.view(torch.uint8), expected.view(torch.uint8)
    )
    assert finite in (None, True)


def test_a_method_is_one_new_file(tmp_path):
    """evomerge.methods imports every module of its package: a file that registers a method is
    all it takes (checked on a copy of the package with one more file)."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import evomerge

    package = Path(evomerge.__file__).parent
    shutil.copytree(package, tmp_path / "evomerge", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "evomerge" / "methods" / "halfway.py").write_text(
        "from evomerge.methods.registry import MergeMethod, register\n"
        "register(MergeMethod(name='halfway',"
        " merge=lambda inputs: (inputs.models[0] + inputs.base) / 2,"
        " params=(), base_role='required', max_models=1))\n"
    )
    check = (
        "from evomerge.methods import method_names; "
        "assert 'halfway' in method_names(), method_names()"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    subprocess.run([sys.executable, "-c", check], env=env, check=True, cwd=tmp_path)


def test_every_method_has_a_reference_or_is_trivial():
    for name in METHODS:
        method = get_method(name)
        assert method.reference or name in ("passthrough", "nuslerp"), name


# --- recipe parsing: properties ------------------------------------------------------------
finite = st.floats(min_value=-10, max_value=10, allow_nan=False, allow_infinity=False)
gradients = st.lists(finite, min_size=1, max_size=7)
unit = st.floats(min_value=0, max_value=1)


@given(values=gradients, t=unit)
def test_gradient_stays_within_its_neighbouring_anchors(values, t):
    value = resolve_setting(values, "model.layers.3.mlp.up_proj.weight", t)
    scaled = t * (len(values) - 1)
    lo = values[int(scaled)]
    hi = values[min(int(scaled) + 1, len(values) - 1)]
    slack = 1e-9 * (1 + abs(lo) + abs(hi))
    assert min(lo, hi) - slack <= value <= max(lo, hi) + slack
    assert min(values) - slack <= value <= max(values) + slack


@given(values=gradients)
def test_gradient_endpoints_are_exact(values):
    assert resolve_setting(values, "x", 0.0) == values[0]
    assert resolve_setting(values, "x", 1.0) == values[-1]


name_parts = st.sampled_from(["self_attn", "mlp", "q_proj", "down_proj", "norm", "embed", "*"])
filters = st.one_of(st.none(), name_parts)
cond_values = st.one_of(finite, gradients)


@given(
    entries=st.lists(st.tuples(filters, cond_values), min_size=1, max_size=5),
    tensor=st.sampled_from(
        [
            "model.layers.1.self_attn.q_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
        ]
    ),
    t=unit,
)
def test_filtered_settings_parse_and_resolve_like_the_first_match(entries, tensor, t):
    setting = [{"value": v} if f is None else {"filter": f, "value": v} for f, v in entries]
    text = yaml.safe_dump(
        {
            "merge_method": "linear",
            "models": [{"model": "a", "parameters": {"weight": setting}}, {"model": "b"}],
        }
    )
    recipe = parse_recipe(text)
    parsed = recipe.models[0].parameters["weight"]
    value = resolve_setting(parsed, tensor, t)
    match = next((v for f, v in entries if f in (None, "*") or f in tensor), None)
    if match is None:
        assert value is None  # falls through to the next level of settings
        return
    anchors = match if isinstance(match, list) else [match]
    slack = 1e-9 * (1 + max(abs(a) for a in anchors))
    assert min(anchors) - slack <= value <= max(anchors) + slack
