"""The search space is derived from the methods' declarations (`evomerge.methods.Param`): names,
kinds, bounds and roles; and those declarations are the parameters mergekit 0.1.5 knows."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from evomerge.errors import UserError
from evomerge.methods import get_method, method_names
from evomerge.spaces.parameters.space import SearchSpace, load_space

HERE = Path(__file__).resolve().parent
SPACES = sorted(p.stem for p in (HERE.parent / "search_spaces").glob("*.yaml"))


def make_space(config, n_models: int) -> SearchSpace:
    models = {f"m{i}": f"/pool/m{i}" for i in range(n_models)}  # folders are not read
    return SearchSpace(config, base="/pool/base", models=models, num_layers=4, dtype="float32")


def test_bundled_spaces_keep_their_genes_and_baselines():
    """golden_spaces.json was written by the code before bounds and baselines came from the
    declarations (f42fafe); each bundled space, over 1-3 models, still gives the same genes with
    the same bounds, and the same baselines in the same order (the order they are queued in)."""
    golden = json.loads((HERE / "golden_spaces.json").read_text())
    # spaces added since (their genes have no earlier version to keep) and data-flow spaces
    added = {
        "ramplus_tl_layers",
        "regmean_layers",
        "dataflow",
        "dataflow_scaled",
        "method_per_group",
        "pairwise_sequence",
    }
    assert {key.split("/")[0] for key in golden} == set(SPACES) - added
    for key, expected in golden.items():
        name, n_models = key.split("/")
        space = make_space(load_space(name), int(n_models))
        assert [f"{g.name} [{g.low:g}, {g.high:g}]" for g in space.genes] == expected["genes"], key
        baselines = space.baselines()
        # task arithmetic's scalings (issue 31) came later: the others are as they were
        assert [
            [label, genome]
            for label, genome in baselines.items()
            if not label.startswith("lambda_")
        ] == expected["baselines"], key


def test_task_arithmetic_spaces_queue_the_classic_scalings():
    space = make_space(load_space("task_arithmetic_layers"), 3)
    baselines = space.baselines()
    labels = [label for label in baselines if label.startswith("lambda_")]
    assert labels == ["lambda_0.3", "lambda_0.5", "lambda_0.7", "lambda_1"]
    for label in labels:
        assert set(baselines[label].values()) == {float(label.removeprefix("lambda_"))}
    # a method that normalises the weights: a scaling is the uniform merge again, not queued
    assert not any(
        label.startswith("lambda_")
        for label in make_space(load_space("ties_layers"), 3).baselines()
    )
    # one model: lambda 1 is `uniform` already
    one = make_space(load_space("task_arithmetic_layers"), 1).baselines()
    assert "lambda_1" not in one and "lambda_0.5" in one


def test_bounds_are_the_declared_ones_unless_the_space_narrows_them():
    declared = get_method("ties").param("density").bounds
    space = make_space(
        load_space({"method": "ties", "search": {"weight": None, "density": None}}), 2
    )
    assert {g.param: (g.low, g.high) for g in space.genes}["density"] == declared
    narrowed = make_space(
        load_space({"method": "ties", "search": {"weight": None, "density": [0.3, 0.6]}}), 2
    )
    assert {g.param: (g.low, g.high) for g in narrowed.genes}["density"] == (0.3, 0.6)


def test_baselines_come_from_roles_not_names():
    """nuslerp's weight and slerp's t carry the roles; a searched parameter without a role
    (lambda) has no classic value, so no baseline is offered for that space."""
    nuslerp = make_space(load_space({"method": "nuslerp", "search": {"weight": None}}), 2)
    assert nuslerp.baselines()["uniform"] == {"all.m0.weight": 0.5, "all.m1.weight": 0.5}
    slerp = make_space(load_space({"method": "slerp", "search": {"t": None}}), 1)
    assert slerp.baselines() == {"uniform": {"all.t": 0.5}, "only_m0": {"all.t": 1.0}}
    with_lambda = make_space(
        load_space({"method": "ties", "search": {"weight": None, "lambda": None}}), 2
    )
    assert with_lambda.baselines() == {}


@pytest.mark.parametrize(
    "space, needles",
    [
        (
            {"method": "ties", "search": {"wieght": None}},
            ["space: search.wieght:", "did you mean 'weight'"],
        ),
        (
            {"method": "ties", "search": {"weight": None}, "fixed": {"normalise": True}},
            ["fixed.normalise", "did you mean 'normalize'"],
        ),
        ({"method": "tis", "search": {"weight": None}}, ["space: method:", "did you mean 'ties'"]),
        (
            {"method": "karcher", "search": {"max_iter": [2, 20]}},
            ["search.max_iter", "only float parameters", "int", "tol"],
        ),
        (
            {"method": "ties", "search": {"weight": None, "rescale": [0, 1]}},
            ["search.rescale", "bool", "weight, density, lambda"],
        ),
        (
            {"method": "model_stock", "search": {"filter_wise": [0, 1]}},
            ["search.filter_wise", "float parameters of 'model_stock': none"],
        ),
        ({"method": "ties", "search": {"density": None}}, ["needs 'weight' searched or fixed"]),
    ],
)
def test_a_space_is_checked_against_the_declarations_when_read(space, needles):
    with pytest.raises(UserError) as info:
        load_space(space)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


MERGEKIT_PARAMETERS = """
import json
from mergekit.merge_methods.registry import registered_methods

print(json.dumps({
    m.spec.name: {p.name: p.scope.name for p in m.spec.parameters} for m in registered_methods()
}))
"""


@pytest.mark.mergekit
def test_declared_parameters_are_the_ones_mergekit_knows(mergekit_python):
    """Refusing undeclared names must never refuse a recipe mergekit 0.1.5 understands: every
    method declares exactly mergekit's parameters, per model where mergekit takes one per input."""
    out = subprocess.run(
        [str(mergekit_python), "-c", MERGEKIT_PARAMETERS],
        check=True,
        capture_output=True,
        text=True,
    )
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    for name in method_names():
        if not get_method(name).mergekit:  # evomerge's own (regmean): mergekit must not have it
            assert name not in theirs, f"mergekit 0.1.5 has {name!r}: declare mergekit=True"
            continue
        ours = {p.name: p.per_model for p in get_method(name).params}
        assert name in theirs, f"mergekit 0.1.5 has no method {name!r}"
        assert {p: scope != "SHARED" for p, scope in theirs[name].items()} == ours, name
