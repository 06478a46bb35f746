"""A search over a pool whose vocabularies differ (issue 28): a specialist that added a chat
token (46 rows against the others' 45), aligned by `pool.tokenizer_source` (or mergekit's
`tokenizer:` block under `pool`) as `evomerge merge` aligns a recipe's models. The live model
has the output vocabulary, every candidate is `evomerge merge` of its recipe bit for bit, and
export writes the merged tokenizer."""

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


def write_config(pool: Path, chat_add: Path, tmp: Path, **vocabulary) -> Path:
    data = pool_search_config(
        pool,
        space="ties_layers",
        tasks=TASKS,
        subset=8,
        batch_size=32,
        search={"sampler": "random", "trials": 3, "seed": 1, "baselines": False},
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


@pytest.mark.parametrize(
    "change, refusal",
    [
        ({"fitness": {"backend": "vllm"}}, "needs `fitness.backend: hf`"),
        ({"search": {"refine": {"steps": 2}}}, "set `refine: null`"),
        ({"space": "regmean_layers"}, "in a RegMean space"),
        ({"space": "dataflow"}, "not in a dataflow space"),
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


@pytest.mark.parametrize("case", list(CASES))
def test_a_search_over_differing_vocabularies_exports_what_it_scored(
    tmp_path, small_pool, chat_add, case
):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from evomerge.cli.process import set_up_process
    from evomerge.merging.executor import run_merge
    from evomerge.merging.recipe import load_recipe
    from evomerge.results.export import export_trial
    from evomerge.search.config import load_run_config
    from evomerge.search.loop import Search
    from evomerge.search.run_folder import write_run_folder

    vocabulary, rows = CASES[case]
    config = load_run_config(write_config(small_pool, chat_add, tmp_path, **vocabulary))
    run_dir = tmp_path / "run"
    torch.set_num_threads(1)
    set_up_process(threads=1, hf_home=run_dir / "hf", offline=True)
    write_run_folder(config, run_dir)
    search = Search(config, run_dir)

    # the live model has the output vocabulary, its tokenizer the merged one
    targets = search.candidate.targets
    assert targets["model.embed_tokens.weight"].shape[0] == rows
    assert targets["lm_head.weight"].shape[0] == rows
    assert search.evaluator.model.config.vocab_size == rows
    assert search.evaluator.lm.tokenizer.get_vocab()[ADDED] == 45

    search.run(until=3, progress=False)
    trials = search.study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3

    trial = trials[1]
    search.candidate.apply(trial.params)
    scored = {name: t.detach().clone() for name, t in targets.items()}
    export_trial(run_dir, tmp_path / "export", trial_number=trial.number)
    out = tmp_path / "export"
    exported = load_file(str(out / "model.safetensors"))
    assert exported.keys() == scored.keys()
    assert all(torch.equal(exported[k], scored[k]) for k in scored)
    # the recipe export wrote carries the vocabulary source, and `evomerge merge` of it is
    # again the scored model
    recipe = load_recipe(out / "recipe.yaml")
    assert recipe.vocabulary_source() == "union"
    run_merge(recipe, tmp_path / "again", seed=config.search.merge_seed)
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(torch.equal(again[k], scored[k]) for k in scored)

    # export writes the union tokenizer, the one the search scored with
    written = AutoTokenizer.from_pretrained(str(out))
    assert written.get_vocab() == search.evaluator.lm.tokenizer.get_vocab()
    assert written.get_vocab()[ADDED] == 45
    written_config = json.loads((out / "config.json").read_text())
    assert written_config["vocab_size"] == rows
    # and the stop tokens the search's model had
    assert written_config["eos_token_id"] == search.evaluator.model.config.eos_token_id
