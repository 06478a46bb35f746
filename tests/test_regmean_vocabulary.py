"""RegMean over a pool whose vocabularies differ (a fine-tune that added a chat token), aligned
by `pool.tokenizer_source`: the statistics are collected with each model's embedding and head
in the output vocabulary, kept over the model's own rows, and laid out by token again at merge
time as the rows are; the search exports what it scored, and `evomerge merge` of the exported
recipe is that model too."""

from __future__ import annotations

import pytest
from helpers.pool_fixtures import small_pool  # noqa: F401 (a fixture)
from helpers.vocab_models import base_tokens, build_vocab_pool, vocab_of
from test_search_vocabulary import (  # noqa: F401 (chat_add: a fixture)
    ADDED,
    chat_add,
    search_and_export,
    write_config,
)

EMBEDDING = "model.embed_tokens.weight"


def test_a_regmean_search_over_differing_vocabularies_exports_what_it_scored(
    tmp_path,
    small_pool,  # noqa: F811
    chat_add,  # noqa: F811
):
    from safetensors.torch import load_file

    from evomerge.io.statistics import InputStatistics
    from evomerge.merging.plan import plan_merge
    from evomerge.merging.recipe import load_recipe

    config = write_config(
        small_pool, chat_add, tmp_path, space="regmean_layers", tokenizer_source="union"
    )
    search, _, out = search_and_export(config, tmp_path)
    assert search.evaluator.model.config.vocab_size == 46
    recipe = load_recipe(out / "recipe.yaml")
    assert recipe.vocabulary_source() == "union" and recipe.statistics
    # each file is over its model's own rows: the fine-tune that added the token has 46
    rows = {model: load_file(path)[EMBEDDING].shape[0] for model, path in recipe.statistics.items()}
    assert rows[str(chat_add)] == 46
    assert {n for m, n in rows.items() if m != str(chat_add)} == {45}
    # ... and the merge lays them out in the output rows, 0 where a model lacks the token
    plan = plan_merge(recipe)
    job = next(j for j in plan.jobs if j.out_name == EMBEDDING)
    aligned = dict(zip([r.model for r in job.inputs], plan.grams(job)()))
    own = InputStatistics(recipe.statistics)
    for model, vector in aligned.items():
        assert vector.shape == (46,)
        assert vector[:45].equal(own.gram(model, EMBEDDING)[:45])
        added = own.gram(model, EMBEDDING)[45] if model == str(chat_add) else 0.0
        assert float(vector[45]) == float(added)


def write_rows(path, values) -> None:
    from safetensors.torch import save_file

    from evomerge.io.statistics import pack

    tensors, metadata = pack({EMBEDDING: values}, {})
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize(
    "source, tied", [("union", False), ("base", False), ("chat", False), ("union", True)]
)
def test_per_row_statistics_of_an_added_token_land_on_its_output_row(tmp_path, source, tied):
    """chat added <|im_start|> and <|im_end|> (its rows n, n + 1 past the base's n), other
    added xyz and qq (its rows n, n + 1): in the output vocabulary these are other rows, and
    the statistics go there too; a token a model lacks has frequency 0 for it, and moving
    them back gives the file again. Tied embeddings: the one matrix merges by them."""
    import torch

    from evomerge.merging.plan import plan_merge
    from evomerge.merging.recipe import Recipe

    folders = build_vocab_pool(tmp_path / "pool", tied=tied)
    n = len(base_tokens())
    models = {name: str(folders[name]) for name in ("other", "chat")}
    own = {}
    for name in models:
        own[name] = torch.arange(1.0, n + 3.0) + (100 if name == "other" else 0)  # (n + 2,)
        write_rows(tmp_path / f"{name}.safetensors", own[name])
    source = {"union": "union", "base": "base", "chat": models["chat"]}[source]
    recipe = Recipe.model_validate(
        {
            "merge_method": "regmean",
            "base_model": str(folders["base"]),
            "models": [{"model": m, "parameters": {"weight": 0.5}} for m in models.values()],
            "tokenizer_source": source,
            "statistics": {m: str(tmp_path / f"{n}.safetensors") for n, m in models.items()},
        }
    )
    plan = plan_merge(recipe)
    job = next(j for j in plan.jobs if j.out_name == EMBEDDING)
    assert tied != any(j.out_name == "lm_head.weight" for j in plan.jobs)
    aligned = dict(zip([r.model for r in job.inputs], plan.grams(job)()))
    vocab = plan.vocabulary.vocab
    for name, model in models.items():
        theirs = vocab_of(folders[name])
        assert aligned[model].shape == (plan.vocabulary.size,)
        for token, row in vocab.items():
            expected = own[name][theirs[token]] if token in theirs else 0.0
            assert float(aligned[model][row]) == float(expected), (name, token)
        back = plan.vocabulary.own_statistics(model, aligned[model], n + 2)
        kept = [theirs[t] for t in vocab if t in theirs]
        assert back[kept].equal(own[name][kept])
    if source == "union":  # the added tokens are elsewhere in the output than in either model
        assert (vocab["xyz"], vocab["<|im_start|>"]) == (n, n + 2)
        assert float(aligned[models["chat"]][vocab["<|im_start|>"]]) == n + 1.0
        assert float(aligned[models["other"]][vocab["<|im_start|>"]]) == 0.0


def test_statistics_collected_in_the_output_vocabulary_are_kept_over_each_models_rows(tmp_path):
    """The live model has the output (union) vocabulary and the documents its ids; each model's
    token frequencies land in its file at its own row of each token, 0 for a token it lacks."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.fitness.statistics import write_statistics
    from evomerge.fitness.teacher import Example
    from evomerge.merging.plan import plan_merge
    from evomerge.merging.recipe import Recipe

    folders = build_vocab_pool(tmp_path / "pool")
    n = len(base_tokens())
    models = {name: str(folders[name]) for name in ("other", "chat")}
    recipe = Recipe.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(folders["base"]),
            "models": [{"model": m, "parameters": {"weight": 0.5}} for m in models.values()],
            "tokenizer_source": "union",
        }
    )
    plan = plan_merge(recipe)
    vocab = plan.vocabulary.vocab
    config = LlamaConfig.from_pretrained(str(folders["base"]))
    config.vocab_size = plan.vocabulary.size
    live = LlamaForCausalLM(config).eval()
    start, xyz, a = vocab["<|im_start|>"], vocab["xyz"], vocab["a"]
    tokens = (1, start, a, xyz, start, a, a, 2)  # the last is predicted, never an input
    examples = [Example(task="t", doc=0, tokens=tokens, n_answer=1)]
    files = write_statistics(
        live, examples, models, tmp_path / "stats", restore=str(folders["base"]), plan=plan
    )
    counted = len(tokens) - 1
    for name in models:
        theirs = vocab_of(folders[name])
        frequency = load_file(str(files[name]))[EMBEDDING]
        assert frequency.shape == (n + 2,)  # its own rows
        assert float(frequency[theirs["a"]]) == pytest.approx(3 / counted)
        for token, times in (("<|im_start|>", 2), ("xyz", 1)):
            if token in theirs:
                assert float(frequency[theirs[token]]) == pytest.approx(times / counted)
            else:
                assert token not in {t for t, i in theirs.items() if frequency[i] > 0}
        # <s> once, a three times, and the token of the two it has
        assert float(frequency.sum()) == pytest.approx((6 if name == "chat" else 5) / counted)
