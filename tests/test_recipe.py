"""Recipes: write-back that both evomerge and mergekit read, and clear messages for mistakes."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

# Recipes exercising every kind of setting; model names need not exist to be parsed.
from test_mergekit_golden import CASES  # tests/ is on sys.path under pytest

from evomerge.errors import UserError
from evomerge.merging.recipe import Recipe, parse_recipe
from evomerge.methods import get_method

WRITE_BACK = {case.id: case.recipe.replace("$", "") for case in CASES}
WRITE_BACK["chat_template_tokenizer"] = """
merge_method: linear
tokenizer_source: base
chat_template: "{% for m in messages %}{{ m.content }}{% endfor %}"
dtype: float16
models:
  - model: org/model-a
    parameters: {weight: 1.0e-3}
  - model: org/model-b
    parameters:
      weight:
        - filter: "*"
          value: [1, 2, 3]
"""


# --- write-back ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(WRITE_BACK))
def test_to_yaml_reads_back_to_an_equal_recipe(name):
    recipe = parse_recipe(WRITE_BACK[name])
    again = parse_recipe(recipe.to_yaml())
    assert again == recipe
    assert again.to_yaml() == recipe.to_yaml()  # a fixed point after one round


@pytest.fixture(scope="module")
def mergekit_parsed(mergekit_python):
    """mergekit's MergeConfiguration of every original recipe and of its write-back."""
    from helpers.mergekit_env import run_driver

    jobs = []
    for name, text in WRITE_BACK.items():
        jobs.append({"name": f"{name}/original", "recipe": text})
        jobs.append({"name": f"{name}/written", "recipe": parse_recipe(text).to_yaml()})
    return run_driver(mergekit_python, {"parse": jobs})


@pytest.mark.mergekit
@pytest.mark.parametrize("name", sorted(WRITE_BACK))
def test_mergekit_reads_our_yaml_as_it_reads_the_original(name, mergekit_parsed):
    original, written = mergekit_parsed[f"{name}/original"], mergekit_parsed[f"{name}/written"]
    assert original["ok"], original.get("error")
    assert written["ok"], written.get("error")
    assert written["config"] == original["config"]


# Round trip for generated recipes, not just the hand-written ones.
names = st.sampled_from(["org/a", "org/b", "./local/c", "d"])
numbers = st.one_of(
    st.integers(-3, 3), st.floats(-2, 2, allow_nan=False).map(lambda x: round(x, 6))
)
values = st.one_of(numbers, st.lists(numbers, min_size=1, max_size=4), st.booleans())
conditionals = st.lists(
    st.builds(
        lambda f, v: {"value": v} if f is None else {"filter": f, "value": v},
        st.one_of(st.none(), st.sampled_from(["self_attn", "mlp", "*"])),
        st.one_of(numbers, st.lists(numbers, min_size=1, max_size=4)),
    ),
    min_size=1,
    max_size=3,
)


@st.composite
def models_recipes(draw):
    """A recipe of `models:` whose parameter names are ones its method declares."""
    method = draw(st.sampled_from(["linear", "ties", "slerp", "dare_ties", "della"]))
    parameters = st.dictionaries(
        st.sampled_from([p.name for p in get_method(method).params]),
        st.one_of(values, conditionals),
        max_size=3,
    )
    recipe = {
        "merge_method": method,
        "models": draw(
            st.lists(
                st.fixed_dictionaries({"model": names}, optional={"parameters": parameters}),
                min_size=1,
                max_size=3,
            )
        ),
    }
    optional = st.fixed_dictionaries(
        {},
        optional={
            "base_model": names,
            "parameters": parameters,
            "dtype": st.sampled_from(["float32", "bfloat16", "float16"]),
            "out_dtype": st.sampled_from(["float32", "bfloat16"]),
        },
    )
    return {**recipe, **draw(optional)}


@settings(max_examples=150, deadline=None)
@given(data=models_recipes())
def test_generated_recipes_round_trip(data):
    recipe = parse_recipe(yaml.safe_dump(data))
    assert parse_recipe(recipe.to_yaml()) == recipe


# --- mistakes ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, wrong, suggestion",
    [
        ("merge_methd: linear\nmodels: [{model: a}]", "merge_methd", "merge_method"),
        ("merge_method: linear\nmodels: [{model: a}]\nbase_modle: a", "base_modle", "base_model"),
        (
            "merge_method: linear\nmodels: [{model: a, paramters: {weight: 1}}]",
            "paramters",
            "parameters",
        ),
        (
            "merge_method: passthrough\nslices: [{sources: [{model: a, layer_rnage: [0, 2]}]}]",
            "layer_rnage",
            "layer_range",
        ),
        (
            "merge_method: passthrough\nslices: [{source: [{model: a, layer_range: [0, 2]}]}]",
            "source",
            "sources",
        ),
        (
            "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n"
            "      weight: [{filtr: mlp, value: 1}]",
            "filtr",
            "filter",
        ),
    ],
)
def test_unknown_key_names_the_closest_valid_key(text, wrong, suggestion):
    with pytest.raises(UserError) as info:
        parse_recipe(text)
    message = str(info.value)
    assert wrong in message
    assert f"did you mean {suggestion!r}" in message


def test_union_tokenizer_is_accepted():
    text = "merge_method: linear\ntokenizer_source: union\nmodels: [{model: a}, {model: b}]"
    assert parse_recipe(text).vocabulary_source() == "union"  # merged: tests/test_vocabulary.py


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("merge_method: linear", "exactly one of 'models' or 'slices'"),
        ("merge_method: linear\nmodels: []", "empty"),
        ("merge_method: linear\ndtype: float8\nmodels: [{model: a}]", "float8"),
        ("models: [{model: a}]", "merge_method"),
        ("- just\n- a list", "mapping"),
        ("merge_method: [unclosed", "line 1"),
        (
            "merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [3, 1]}]}]",
            "layer_range",
        ),
    ],
)
def test_other_mistakes_are_one_clear_user_error(text, fragment):
    with pytest.raises(UserError, match=None) as info:
        parse_recipe(text)
    assert fragment in str(info.value)


def test_recipe_type_is_the_public_one():
    recipe = parse_recipe("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]")
    assert isinstance(recipe, Recipe)


# --- parameter names -----------------------------------------------------------------------
TIES_BASE = "merge_method: ties\nbase_model: base\n"


@pytest.mark.parametrize(
    "text, path, suggestion",
    [
        (
            TIES_BASE + "parameters: {lamda: 3}\nmodels: [{model: a, parameters: {weight: 1}}]",
            "parameters.lamda",
            "lambda",
        ),
        (
            TIES_BASE + "models:\n  - {model: a, parameters: {weight: 1}}\n"
            "  - {model: b, parameters: {densty: 0.2}}",
            "models[1].parameters.densty",
            "density",
        ),
        (
            TIES_BASE + "models:\n  - model: a\n    parameters:\n      weight: 1\n"
            "      densty: [{filter: mlp, value: 0.2}, {value: 1}]",
            "models[0].parameters.densty",
            "density",
        ),
        (
            TIES_BASE + "slices:\n  - parameters: {wieght: [0, 1]}\n    sources:\n"
            "      - {model: a, layer_range: [0, 2]}\n      - {model: base, layer_range: [0, 2]}",
            "slices[0].parameters.wieght",
            "weight",
        ),
        (
            TIES_BASE + "slices:\n  - sources:\n"
            "      - {model: a, layer_range: [0, 2], parameters: {weight: 1}}\n"
            "      - {model: base, layer_range: [0, 2]}\n  - sources:\n"
            "      - {model: a, layer_range: [2, 4],\n"
            "         parameters: {weight: 1, densty: [{filter: mlp, value: 0.5}]}}\n"
            "      - {model: base, layer_range: [2, 4]}",
            "slices[1].sources[0].parameters.densty",
            "density",
        ),
        (
            "merge_method: slerp\nbase_model: base\nmodels: [{model: a}]\n"
            "parameters: {wieght: 0.5}",
            "parameters.wieght",
            None,
        ),  # nothing close, and no method's: the message lists what slerp has
    ],
    ids=[
        "global",
        "per-model",
        "per-model-conditional",
        "per-slice",
        "per-source-conditional",
        "other-method",
    ],
)
def test_unknown_parameter_names_the_path_and_the_closest_parameter(text, path, suggestion):
    """A misspelled parameter used to be ignored (the merge ran at its default); it is refused
    at every level, with the path to it and the closest name the method declares."""
    with pytest.raises(UserError) as info:
        parse_recipe(text, source="r.yaml")
    message = str(info.value)
    assert message.startswith(f"r.yaml: {path}: "), message
    hint = f"did you mean {suggestion!r}" if suggestion else "(known: t)"
    assert hint in message, message


@pytest.mark.parametrize("method", ["slerp", "model_stock", "sce", "nearswap", "karcher"])
def test_a_parameter_another_method_takes_is_ignored_with_a_warning(method, caplog):
    """mergekit runs `weight` on a method that takes none (it ignores it); so does evomerge,
    saying so in one line, and the recipe means what it means without it."""
    text = (
        f"merge_method: {method}\nbase_model: base\n"
        "models: [{model: a, parameters: {weight: 0.3}}, {model: b}]\nparameters: {weight: 0.5}"
    )
    with caplog.at_level("WARNING", logger="evomerge.merging.recipe"):
        recipe = parse_recipe(text, source="r.yaml")
    warned = [r.getMessage() for r in caplog.records]
    assert any("parameters.weight" in w and "is ignored" in w for w in warned), warned
    assert any("models[0].parameters.weight" in w for w in warned), warned
    assert recipe.merge_method == method


def test_unknown_merge_method_is_refused_when_parsed():
    with pytest.raises(
        UserError, match=r"merge_method: unknown merge method 'tiez'; did you mean 'ties'"
    ):
        parse_recipe("merge_method: tiez\nmodels: [{model: a}]")


def test_every_declared_parameter_is_accepted_at_every_level():
    """The check refuses only names the method does not declare."""
    for name in (
        "ties",
        "della",
        "breadcrumbs",
        "slerp",
        "karcher",
        "nuslerp",
        "sce",
        "passthrough",
    ):
        params = {p.name: 1 for p in get_method(name).params}
        text = yaml.safe_dump(
            {
                "merge_method": name,
                "base_model": "base",
                "parameters": params,
                "slices": [
                    {
                        "parameters": params,
                        "sources": [{"model": "a", "layer_range": [0, 2], "parameters": params}],
                    }
                ],
            }
        )
        assert parse_recipe(text).merge_method == name
