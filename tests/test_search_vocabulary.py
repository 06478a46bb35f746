"""A search over a pool whose vocabularies differ (issue 28): a specialist that added a chat
token (46 rows against the others' 45), aligned by `pool.tokenizer_source` (or mergekit's
`tokenizer:` block under `pool`) as `evomerge merge` aligns a recipe's models. The live model
has the output vocabulary, every candidate is `evomerge merge` of its recipe bit for bit, and
export writes the merged tokenizer: in a parameter space, a method-per-group space (each
method's stage aligned) and a data-flow space (aligned to one model's vocabulary)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from helpers.pool_fixtures import pool_search_config

TASKS = ["evomerge_add", "evomerge_rev", "evomerge_sort"]
ADDED = "<|im_end|>"


def widened(src: Path, dst: Path) -> Path:
    """A copy of model folder `src` whose tokenizer has one more special token and whose
    embedding and head have a row for it (a fine-tune that added a chat token)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tokenizer = AutoTokenizer.from_pretrained(str(dst))
    tokenizer.add_special_tokens({"additional_special_tokens": [ADDED]})
    tokenizer.save_pretrained(str(dst))
    state = load_file(str(dst / "model.safetensors"))
    gen = torch.Generator().manual_seed(7)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows = state[name]
        new = rows.mean(0, keepdim=True) + 0.05 * torch.randn((1, rows.shape[1]), generator=gen)
        state[name] = torch.cat([rows, new.to(rows.dtype)]).contiguous()
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["vocab_size"] += 1
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


@pytest.fixture(scope="module")
def chat_add(small_pool, tmp_path_factory) -> Path:
    return widened(small_pool / "add", tmp_path_factory.mktemp("vocab") / "add-chat")


def write_config(
    pool: Path, chat_add: Path, tmp: Path, *, space="ties_layers", trials=3, **vocabulary
) -> Path:
    data = pool_search_config(
        pool,
        space=space,
        tasks=TASKS,
        subset=8,
        batch_size=32,
        search={"sampler": "random", "trials": trials, "seed": 1, "baselines": False},
    )
    data["pool"]["models"]["add"] = str(chat_add)
    data["pool"].update(vocabulary)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_without_a_source_the_pool_is_refused_naming_the_key(tmp_path, small_pool, chat_add):
    from evomerge.errors import UserError
    from evomerge.search.config import load_run_config

    with pytest.raises(UserError, match=r"different vocabularies.*pool\.tokenizer_source: union"):
        load_run_config(write_config(small_pool, chat_add, tmp_path))


def test_a_pool_name_names_the_source_model(tmp_path, small_pool, chat_add):
    from evomerge.search.config import load_run_config

    config = load_run_config(write_config(small_pool, chat_add, tmp_path, tokenizer_source="add"))
    assert config.pool.tokenizer_source == str(chat_add)
    assert config.pool.vocabulary() == {"tokenizer_source": str(chat_add)}


def test_an_aligned_pool_may_be_scored_by_the_vllm_backend(tmp_path, small_pool, chat_add):
    """The engine starts from a copy of the live model (tests/test_vllm.py runs it)."""
    from evomerge.search.config import load_run_config

    path = write_config(small_pool, chat_add, tmp_path, tokenizer_source="union")
    data = yaml.safe_load(path.read_text())
    data["fitness"]["backend"] = "vllm"
    path.write_text(yaml.safe_dump(data))
    config = load_run_config(path)
    assert (config.fitness.backend, config.pool.tokenizer_source) == ("vllm", "union")


@pytest.mark.parametrize(
    "change, refusal",
    [
        ({"search": {"refine": {"steps": 2}}}, "set `refine: null`"),
        ({"space": "pairwise_sequence"}, "cannot align vocabularies in a pairwise space"),
        # a union is read from the path's models, which change with the genome
        ({"space": "dataflow"}, "not to 'union', which is read from the path's models"),
    ],
)
def test_the_source_must_suit_the_search(tmp_path, small_pool, chat_add, change, refusal):
    from evomerge.errors import UserError
    from evomerge.search.config import load_run_config
    from evomerge.search.run_folder import build_space

    path = write_config(small_pool, chat_add, tmp_path, tokenizer_source="union")
    data = yaml.safe_load(path.read_text())
    for key, value in change.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match=re.escape(refusal)):
        build_space(load_run_config(path))


CASES = {
    "union": ({"tokenizer_source": "union"}, 46),
    "block": (
        {
            "tokenizer": {
                "source": "union",
                "pad_to_multiple_of": 16,
                # a pool name (and `base`) may name a model
                "tokens": {
                    ADDED: {"source": {"kind": "model_token", "model": "base", "token": "</s>"}}
                },
            }
        },
        48,
    ),
}


def test_a_data_flow_space_takes_no_token_embedding_from_a_model(tmp_path, small_pool, chat_add):
    from evomerge.errors import UserError
    from evomerge.search.config import load_run_config
    from evomerge.search.run_folder import build_space

    block = {"source": "add", "tokens": {ADDED: {"source": "base"}}}
    path = write_config(small_pool, chat_add, tmp_path, space="dataflow", tokenizer=block)
    with pytest.raises(UserError, match="may take no model's embedding"):
        build_space(load_run_config(path))


def search_and_export(config_path: Path, tmp_path: Path, *, pick=None):
    """Run the config's search, then export a completed trial (`pick(trials)`, default the
    second): (search, trial, the scored live tensors, the export folder). Checks that the
    exported model and `evomerge merge` of the exported recipe are the scored one bit for bit."""
    import torch
    from safetensors.torch import load_file

    from evomerge.cli.process import set_up_process
    from evomerge.merging.multistage import load_stages, run_stages
    from evomerge.results.export import export_trial
    from evomerge.search.config import load_run_config
    from evomerge.search.loop import Search
    from evomerge.search.run_folder import write_run_folder

    config = load_run_config(config_path)
    run_dir = tmp_path / "run"
    torch.set_num_threads(1)
    set_up_process(threads=1, hf_home=run_dir / "hf", offline=True)
    write_run_folder(config, run_dir)
    search = Search(config, run_dir)
    search.run(until=config.search.trials, progress=False)
    trials = search.study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE"] * config.search.trials, [
        t.user_attrs.get("fail_reason") for t in trials
    ]
    trial = pick(trials) if pick else trials[1]
    search.candidate.apply(trial.params)
    model = search.evaluator.model  # the live evaluation model
    scored = {name: t.detach().clone() for name, t in model.state_dict().items()}
    out = tmp_path / "export"
    export_trial(run_dir, out, trial_number=trial.number)
    exported = load_file(str(out / "model.safetensors"))
    assert exported.keys() == scored.keys()
    assert all(torch.equal(exported[k], scored[k]) for k in scored)
    # `evomerge merge` of the recipe export wrote is again the scored model
    run_stages(load_stages(out / "recipe.yaml"), tmp_path / "again", seed=config.search.merge_seed)
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(torch.equal(again[k], scored[k]) for k in scored)
    return search, trial, out


def assert_exported_vocabulary(search, out: Path, rows: int) -> None:
    """Export wrote the tokenizer the search scored with (the chat token at 45), its row
    count and its stop tokens."""
    from transformers import AutoTokenizer

    written = AutoTokenizer.from_pretrained(str(out))
    assert written.get_vocab() == search.evaluator.lm.tokenizer.get_vocab()
    assert written.get_vocab()[ADDED] == 45
    written_config = json.loads((out / "config.json").read_text())
    assert written_config["vocab_size"] == rows
    assert written_config["eos_token_id"] == search.evaluator.model.config.eos_token_id


@pytest.mark.parametrize("case", list(CASES))
def test_a_search_over_differing_vocabularies_exports_what_it_scored(
    tmp_path, small_pool, chat_add, case
):
    from evomerge.merging.recipe import load_recipe

    vocabulary, rows = CASES[case]
    search, _, out = search_and_export(
        write_config(small_pool, chat_add, tmp_path, **vocabulary), tmp_path
    )
    # the live model has the output vocabulary, its tokenizer the merged one
    targets = search.candidate.targets
    assert targets["model.embed_tokens.weight"].shape[0] == rows
    assert targets["lm_head.weight"].shape[0] == rows
    assert search.evaluator.model.config.vocab_size == rows
    assert search.evaluator.lm.tokenizer.get_vocab()[ADDED] == 45
    # the recipe export wrote carries the vocabulary source
    assert load_recipe(out / "recipe.yaml").vocabulary_source() == "union"
    assert_exported_vocabulary(search, out, rows)


METHOD_PER_GROUP = {
    "kind": "method_per_group",
    "methods": ["task_arithmetic", "ties"],
    "layers_per_group": 1,  # two groups: a trial may choose two methods, merged in stages
    "search": {"weight": None, "density": [0.1, 1.0]},
}


def test_a_method_per_group_search_over_differing_vocabularies_exports_what_it_scored(
    tmp_path, small_pool, chat_add
):
    from evomerge.merging.multistage import load_stages

    def two_methods(trials):
        mixed = [t for t in trials if len(set(search_space.chosen(t.params))) > 1]
        assert mixed, "no trial chose two methods"
        return mixed[0]

    path = write_config(
        small_pool, chat_add, tmp_path, space=METHOD_PER_GROUP, trials=4, tokenizer_source="union"
    )
    from evomerge.search.config import load_run_config
    from evomerge.search.run_folder import build_space

    search_space = build_space(load_run_config(path))
    search, _, out = search_and_export(path, tmp_path, pick=two_methods)
    assert search.evaluator.model.config.vocab_size == 46
    stages = load_stages(out / "recipe.yaml")
    assert len(stages) == 3  # one per method, then the passthrough of their groups
    assert [s.recipe.vocabulary_source() for s in stages] == ["union", "union", None]
    assert_exported_vocabulary(search, out, 46)


def test_a_data_flow_search_over_differing_vocabularies_exports_what_it_scored(
    tmp_path, small_pool, chat_add
):
    from transformers import AutoTokenizer

    from evomerge.merging.recipe import load_recipe

    path = write_config(
        small_pool, chat_add, tmp_path, space="dataflow_scaled", trials=4, tokenizer_source="add"
    )

    def starts_elsewhere(trials):  # its embedding: rows of a model without the chat token
        paths = [search_space.path(t.params) for t in trials]
        chosen = [t for t, p in zip(trials, paths) if p[0].source != "add" and len(p) > 1]
        assert chosen, paths
        return chosen[0]

    from evomerge.search.config import load_run_config
    from evomerge.search.run_folder import build_space

    search_space = build_space(load_run_config(path))
    search, trial, out = search_and_export(path, tmp_path, pick=starts_elsewhere)
    model = search.evaluator.model
    assert model.model.embed_tokens.weight.shape[0] == 46
    # a model without the chat token has no row for it: zeros, as `evomerge merge` writes
    assert not model.model.embed_tokens.weight[45].any()
    assert load_recipe(out / "recipe.yaml").vocabulary_source() == str(chat_add)
    assert_exported_vocabulary(search, out, 46)
    # the output vocabulary is the union of the pool's
    pool = [small_pool / "base", chat_add, small_pool / "rev", small_pool / "sort"]
    union = set().union(*(AutoTokenizer.from_pretrained(str(p)).get_vocab() for p in pool))
    assert set(AutoTokenizer.from_pretrained(str(out)).get_vocab()) == union


def test_an_aligned_search_with_a_named_chat_template_stops_at_its_end_of_turn(
    tmp_path, small_pool, chat_add
):
    from transformers import AutoTokenizer

    from evomerge.merging.chat_templates import NAMED_TEMPLATES

    path = write_config(
        small_pool, chat_add, tmp_path, tokenizer_source="union", chat_template="chatml"
    )
    search, _, out = search_and_export(path, tmp_path)
    live = search.evaluator
    assert live.lm.tokenizer.chat_template == NAMED_TEMPLATES["chatml"]
    # ChatML ends a turn with the added token (45): generation stops there too, as in the export
    eos = live.model.config.eos_token_id
    assert live.model.generation_config.eos_token_id == [eos, 45]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [eos, 45]
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == NAMED_TEMPLATES["chatml"]
    assert_exported_vocabulary(search, out, 46)


@pytest.mark.parametrize("tied", [True, False])
def test_data_flow_candidates_over_bpe_vocabularies_are_their_merges(tmp_path, tied):
    """Tiny Llamas with BPE tokenizers (an added pad, chat tokens, two ordinary tokens), tied
    or not, aligned to the chat model's vocabulary padded to 48 rows: every candidate the live
    model holds is `evomerge merge` of its passthrough recipe, tensor for tensor."""
    import random

    import torch
    from helpers.vocab_models import build_vocab_pool
    from safetensors.torch import load_file

    from evomerge.fitness.live_model import load_live_model
    from evomerge.io.output import write_config
    from evomerge.merging.executor import run_merge, write_tokenizer
    from evomerge.merging.plan import plan_merge
    from evomerge.merging.recipe import TokenizerSettings
    from evomerge.spaces.dataflow import DataflowCandidate, DataflowConfig, DataflowSpace

    pool = build_vocab_pool(tmp_path / "pool", tied=tied)
    space = DataflowSpace(
        DataflowConfig(kind="dataflow", scale=(0.5, 1.5)),
        base=str(pool["base"]),
        models={name: str(pool[name]) for name in ("pad", "chat", "other")},
        dtype="float32",
    )
    block = TokenizerSettings(source=str(pool["chat"]), pad_to_multiple_of=16)
    space.vocabulary = {"tokenizer": block, "chat_template": "chatml"}
    # the live model as the search loads it (`evomerge.search.loop.load_eval_model`)
    plan = plan_merge(space.recipe({g.name: g.low for g in space.genes}))
    folder = tmp_path / "vocabulary"
    folder.mkdir()
    write_config(pool["base"], folder, layer_sources=plan.layer_sources(), dtype="float32")
    write_tokenizer(plan, folder)
    model, _ = load_live_model(pool["base"], dtype=torch.float32, vocabulary=folder)
    candidate = DataflowCandidate(model, space, dtype=torch.float32)
    assert model.get_input_embeddings().weight.shape[0] == 48

    rng = random.Random(0)
    batch = torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(0))
    for index in range(4):
        genome = {g.name: rng.uniform(g.low, g.high) for g in space.genes}
        candidate.apply(genome)
        scored = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out = tmp_path / f"merge{index}"
        run_merge(space.recipe(genome), out)
        exported = load_file(str(out / "model.safetensors"))
        # a tied head is the embedding, which the file holds once
        assert exported.keys() == {k for k in scored if not (tied and k == "lm_head.weight")}
        assert all(torch.equal(exported[k], scored[k]) for k in exported)
        if tied:
            assert model.lm_head.weight is model.model.embed_tokens.weight
        with torch.no_grad():
            assert torch.isfinite(model(batch).logits).all()
