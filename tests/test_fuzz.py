"""Property-based tests: whatever text a recipe file holds, parsing ends in a `Recipe` or a
`UserError` (never another exception); whatever genome a sampler hands over, decoding ends in
a recipe that plans, or a `UserError`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers.tiny_models import build_tiny_pool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evomerge.errors import UserError
from evomerge.merging.plan import plan_merge
from evomerge.merging.recipe import Recipe, parse_recipe
from evomerge.spaces.parameters.space import SearchSpace, SpaceConfig

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

RECIPE_KEYS = [
    "merge_method",
    "models",
    "slices",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "chat_template",
    "model",
    "sources",
    "layer_range",
    "filter",
    "value",
    "weight",
    "density",
    "t",
    "normalize",
    "lambda",
]
METHODS = ["linear", "ties", "slerp", "dare_ties", "passthrough", "task_arithmetic", "nope"]


def parses_or_refuses(text: str) -> None:
    try:
        recipe = parse_recipe(text, source="fuzz.yaml")
    except UserError as exc:
        message = str(exc)
        assert message and "\n" not in message, message  # one sentence, one line
        return
    assert isinstance(recipe, Recipe)
    assert parse_recipe(recipe.to_yaml()) == recipe  # what parses, round-trips


@FUZZ
@given(st.text(max_size=300))
def test_any_text(text):
    parses_or_refuses(text)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 100),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(METHODS + ["float16", "bfloat16", "base", "union", "{{ x }}"]),
    st.text(max_size=8),
)
keys = st.one_of(st.sampled_from(RECIPE_KEYS), st.text(max_size=6), st.integers(0, 3))
structures = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=25,
)


@FUZZ
@given(structures)
def test_any_yaml_structure(data):
    parses_or_refuses(yaml.safe_dump(data))


@st.composite
def recipe_like(draw):
    """Mostly-valid recipes with random damage: the paths a real typo takes."""
    settings_ = st.one_of(
        st.floats(-2, 2),
        st.lists(st.floats(-2, 2), min_size=1, max_size=3),
        st.lists(
            st.fixed_dictionaries(
                {"filter": st.sampled_from(["mlp", "self_attn", "*"]), "value": st.floats(-2, 2)}
            ),
            max_size=2,
        ),
        scalars,
    )
    params = st.dictionaries(
        st.sampled_from(["weight", "density", "t", "normalize", "lambda", "wieght"]),
        settings_,
        max_size=3,
    )
    model = st.fixed_dictionaries(
        {"model": st.sampled_from(["a", "b", "/x/c"])}, optional={"parameters": params}
    )
    source = st.fixed_dictionaries(
        {
            "model": st.sampled_from(["a", "b"]),
            "layer_range": st.lists(st.integers(-2, 40), min_size=0, max_size=3),
        },
        optional={"parameters": params},
    )
    body = draw(st.sampled_from(["models", "slices", "both", "neither"]))
    recipe = {"merge_method": draw(st.sampled_from(METHODS))}
    if body in ("models", "both"):
        recipe["models"] = draw(st.lists(model, max_size=3))
    if body in ("slices", "both"):
        recipe["slices"] = draw(
            st.lists(st.fixed_dictionaries({"sources": st.lists(source, max_size=3)}), max_size=2)
        )
    optional = st.dictionaries(
        st.sampled_from(
            [
                "base_model",
                "parameters",
                "dtype",
                "out_dtype",
                "tokenizer_source",
                "chat_template",
                "merge_methd",
            ]
        ),
        st.one_of(scalars, params),
        max_size=3,
    )
    recipe.update(draw(optional))
    return recipe


@FUZZ
@given(recipe_like())
def test_recipe_like_structures(data):
    parses_or_refuses(yaml.safe_dump(data))


# --- genomes ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    return build_tiny_pool(tmp_path_factory.mktemp("tiny"), n_models=2)


SPACES = [
    {
        "method": "ties",
        "layers_per_group": 2,
        "split": ["self_attn", "mlp"],
        "search": {"weight": None, "density": [0.1, 1.0]},
    },
    {"method": "slerp", "layers_per_group": 1, "search": {"t": None}},
    {"method": "linear", "search": {"weight": [-1.0, 2.0]}, "fixed": {"normalize": False}},
    {
        "method": "dare_ties",
        "layers_per_group": 3,
        "search": {"weight": [0.0, 1.0], "density": [0.0, 1.0], "lambda": None},
    },
]


def make_space(pool, config: dict) -> SearchSpace:
    models = (
        {"m0": str(pool["ft0"])}
        if config["method"] == "slerp"
        else {"m0": str(pool["ft0"]), "m1": str(pool["ft1"])}
    )
    return SearchSpace(
        SpaceConfig(**config), base=str(pool["base"]), models=models, num_layers=4, dtype="float32"
    )


gene_values = st.one_of(
    st.floats(0, 1),  # mostly inside typical bounds
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([-1.0, 0.0, 1.0, 2.0, 1e40, -0.0]),
)


@FUZZ
@given(data=st.data(), which=st.integers(0, len(SPACES) - 1))
def test_any_genome_decodes_to_a_plannable_recipe_or_a_clear_error(pool, data, which):
    space = make_space(pool, SPACES[which])
    genome = {}
    for gene in space.genes:
        if data.draw(st.integers(0, 40), label="drop") == 0:
            continue  # a missing gene now and then
        inside = data.draw(st.floats(gene.low, gene.high), label=gene.name)
        genome[gene.name] = data.draw(
            st.one_of(st.just(inside), gene_values), label=f"{gene.name} value"
        )
    try:
        recipe = space.recipe(genome)
    except UserError as exc:
        assert str(exc)
        assert any(
            g.name not in genome
            or not (math.isfinite(genome[g.name]) and g.low <= genome[g.name] <= g.high)
            for g in space.genes
        ), "a genome inside the bounds was refused"
        return
    assert all(g.low <= genome[g.name] <= g.high for g in space.genes)
    plan = plan_merge(recipe)  # every value the genome gave is valid for the method
    assert len(plan.jobs) == 2 + 9 * 4 + 1
    assert parse_recipe(recipe.to_yaml()) == recipe


def test_space_bounds_outside_a_parameters_limits_are_refused(pool):
    with pytest.raises(UserError, match=r"'density'.*\[0, 1\]"):
        make_space(pool, {"method": "ties", "search": {"weight": None, "density": [0.1, 1.5]}})
