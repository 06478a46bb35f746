"""The registry of space kinds, driven by what is registered and by every file in search_spaces/
(never a hand-written list): each file names a registered kind, each kind has a bundled file,
every space decodes to stages, and every kind's candidate is the model `evomerge merge` makes of
those stages."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from helpers.statistics import give_statistics

from evomerge.spaces.registry import BUNDLED, get_kind, kind_names, kind_of, read_space

FILES = sorted(path.stem for path in BUNDLED.glob("*.yaml"))


def build(name: str, pool: Path, models=("add", "rev", "sort")):
    """The bundled space `name` over the small demo pool, built through the registry (a method
    that merges one model into the base gets one)."""
    from evomerge.methods import get_method

    data, where = read_space(name)
    method = data.get("method") if isinstance(data, dict) else None
    if method and get_method(method).max_models == 1 and kind_of(data) != "pairwise":
        models = models[:1]
    return get_kind(kind_of(data)).build(
        data,
        where,
        base=str(pool / "base"),
        models={m: str(pool / m) for m in models},
        dtype="float32",
    )


def random_genome(space, seed: int) -> dict:
    rng = random.Random(seed)
    return {
        g.name: rng.choice(g.choices) if g.choices else rng.uniform(g.low, g.high)
        for g in space.genes
    }


def test_every_bundled_space_names_a_registered_kind():
    assert FILES
    for name in FILES:
        data, _ = read_space(name)
        assert kind_of(data) in kind_names(), name


def test_every_kind_has_a_bundled_space_so_the_contracts_below_cover_it():
    kinds = {kind_of(read_space(name)[0]) for name in FILES}
    assert kinds == set(kind_names())


def test_an_unknown_kind_is_one_sentence_naming_the_closest():
    from evomerge.errors import UserError

    with pytest.raises(UserError, match="did you mean 'dataflow'"):
        get_kind("data_flow")


@pytest.mark.parametrize("name", FILES)
def test_a_space_is_its_kinds_shape(tmp_path, small_pool, name):
    """The `Space` protocol: the kind it was registered as, genes, baselines that are genomes of
    it, and `decode` giving stages whose last is the unnamed final merge; categorical genes only
    where its kind allows them."""
    from evomerge.merging.multistage import Stage

    space = give_statistics(build(name, small_pool), tmp_path / "statistics")
    kind = get_kind(kind_of(read_space(name)[0]))
    assert space.kind == kind.name and space.genes and space.title
    assert kind.categorical or not any(g.choices for g in space.genes)
    genomes = [*space.baselines().values(), random_genome(space, 0)]
    for genome in genomes:
        assert set(genome) == {g.name for g in space.genes}
        stages = space.decode(genome)
        assert isinstance(stages, list) and all(isinstance(s, Stage) for s in stages)
        assert stages[-1].name is None and all(s.name for s in stages[:-1])


@pytest.mark.parametrize("name", FILES)
def test_every_kinds_candidate_is_the_merge_of_its_stages(tmp_path, small_pool, name):
    """`Candidate.apply(genome)` makes the live model score as the model `evomerge merge` makes
    of `decode(genome)`, for a baseline (where the space has one) and random genomes in turn."""
    from transformers import AutoModelForCausalLM

    from evomerge.merging.multistage import run_stages

    torch.set_num_threads(1)
    space = give_statistics(build(name, small_pool), tmp_path / "statistics")
    live = AutoModelForCausalLM.from_pretrained(small_pool / "base", dtype=torch.float32).eval()
    candidate = get_kind(space.kind).candidate(live, space, seed=3, device="cpu", dtype="float32")
    batch = torch.randint(
        1, live.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0)
    )
    genomes = [
        *list(space.baselines().values())[:1],
        random_genome(space, 1),
        random_genome(space, 2),
    ]
    for index, genome in enumerate(genomes):
        candidate.apply(genome)
        out = tmp_path / str(index)
        run_stages(space.decode(genome), out, seed=3)
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            assert torch.equal(merged(batch).logits, live(batch).logits), (name, index)


def test_a_kind_declares_the_backends_that_can_score_it():
    from evomerge.errors import UserError
    from evomerge.fitness.backends import BACKENDS

    for name in kind_names():
        kind = get_kind(name)
        assert kind.backends is None or set(kind.backends) <= set(BACKENDS), name
        if kind.backends is not None:
            refused = next(b for b in BACKENDS if b not in kind.backends)
            with pytest.raises(UserError, match="score it with fitness.backend"):
                kind.check_backend(refused)


def test_run_json_keeps_each_genes_stage_for_the_report(small_pool):
    """A pairwise sequence's genes name their stage in the gene list run.json keeps, which is
    what the report draws a row per stage from (it parses no gene names)."""
    import json

    from evomerge.results.plots import _stage_prefix
    from evomerge.search.run_folder import RunGenes

    space = build("pairwise_sequence", small_pool)
    genes = json.loads(json.dumps(RunGenes.of(space).to_json()))["genes"]
    stages = {gene["name"]: _stage_prefix(gene) for gene in genes}
    assert stages["order"] == ""
    floats = [name for name in stages if name != "order"]
    assert floats and all(stages[name] == name.split(".")[0] for name in floats)
    assert {stages[name] for name in floats} == {"S1", "S2"}
