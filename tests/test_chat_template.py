"""Instruct models scored as they are used: `fitness.apply_chat_template` (with
`system_instruction` and `fewshot_as_multiturn`) gives exactly what lm-eval's own
`evaluate(..., apply_chat_template=True)` gives, through the prepared-requests path.

The small demo pools' char-level tokenizer gets a chat template (every character of it in the
vocabulary), so the templated prompts differ from the plain ones and the models see them.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest

from evomerge.errors import UserError
from evomerge.fitness import Evaluator, FitnessConfig
from evomerge.fitness.backends import make_lm
from evomerge.fitness.tasks import build_task_set
from evomerge.pool import load_manifest

TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


def _templated(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TEMPLATE
    return tok


def _reference(lm, config: FitnessConfig, run_dir: Path, samples=None) -> dict:
    from lm_eval.evaluator import evaluate

    tasks = build_task_set(config, run_dir)
    out = evaluate(
        lm=lm,
        task_dict=tasks.task_dict,
        samples=samples,
        cache_requests=False,
        bootstrap_iters=0,
        log_samples=True,
        apply_chat_template=config.apply_chat_template,
        system_instruction=config.system_instruction,
        fewshot_as_multiturn=config.fewshot_as_multiturn,
    )
    return {name: (out["results"][name], out["samples"][name]) for name in tasks.leaf_tasks}


def _assert_same(model, tokenizer, config: FitnessConfig, tmp_path: Path) -> dict:
    evaluator = Evaluator(model, tokenizer, config, tmp_path / "run")
    lm = make_lm("hf", model, tokenizer, batch_size=config.batch_size, max_length=None)
    full = evaluator.score(full=True, per_example=True)
    reference = _reference(lm, config, tmp_path / "ref")
    for spec in evaluator.tasks.specs:
        row, rows = reference[spec.name]
        numeric = {k: float(v) for k, v in row.items() if "," in k and "_stderr," not in k}
        assert full.metrics[spec.name] == numeric, spec.name
        metric, _, filt = spec.metric_key.partition(",")
        per_doc = {r["doc_id"]: float(r[metric]) for r in rows if r["filter"] == filt}
        assert full.per_example[spec.name] == [per_doc[d] for d in range(len(per_doc))]
    subset = evaluator.score()
    ref = _reference(lm, config, tmp_path / "ref-subset", samples=evaluator.tasks.subset)
    assert subset.per_task == {
        s.name: float(ref[s.name][0][s.metric_key]) for s in evaluator.tasks.specs
    }
    return {name: rows for name, (_, rows) in reference.items()}


def _prompt(sample: dict) -> str:
    """The context lm-eval logged for a sample (its first request's first argument)."""
    args = sample["arguments"]
    first = args[0] if isinstance(args, list) else next(iter(args.values()))
    return first[0] if isinstance(first, (list, tuple)) else next(iter(first.values()))


def _config(pool: Path, **chat) -> FitnessConfig:
    manifest = load_manifest(pool)
    return FitnessConfig(
        tasks=manifest["tasks"],
        task_paths=[manifest["task_path"]],
        subset={"count": 12},
        batch_size=16,
        **chat,
    )


@pytest.mark.parametrize(
    "chat",
    [
        {"apply_chat_template": True},
        {"apply_chat_template": True, "system_instruction": "be exact."},
    ],
)
def test_templated_loglikelihood_requests_score_as_lm_eval(
    chat: dict, small_pool: Path, small_pool_models: dict, tmp_path: Path
) -> None:
    tokenizer = _templated(small_pool_models["tokenizer"])
    rows = _assert_same(small_pool_models["add"], tokenizer, _config(small_pool, **chat), tmp_path)
    # the prompts really went through the template
    prompt = _prompt(rows["evomerge_add"][0])
    assert prompt.startswith("s:be exact. u:a:" if "system_instruction" in chat else "u:a:")
    assert prompt.endswith("= a:")


def test_templated_generation_and_fewshot_turns_score_as_lm_eval(
    small_pool2: Path, small_pool2_models: dict, tmp_path: Path
) -> None:
    # a copy of the pool's tasks with a few-shot example each, given as an earlier turn (one:
    # the small models' window is 64 characters, and truncated inputs are another matter)
    pool = tmp_path / "pool"
    shutil.copytree(small_pool2, pool)
    for yaml_file in (pool / "tasks").glob("*.yaml"):
        text = yaml_file.read_text()
        yaml_file.write_text(text + "num_fewshot: 1\nfewshot_split: dev\n")
    config = _config(pool, apply_chat_template=True, fewshot_as_multiturn=True)
    tokenizer = _templated(small_pool2_models["tokenizer"])
    rows = _assert_same(small_pool2_models["shift"], tokenizer, config, tmp_path)
    prompt = _prompt(rows["evomerge_shift"][0])
    assert prompt.count("u:") == 2 and prompt.count("a:") == 2  # the shot and the question


def test_chat_template_options_are_checked(small_pool: Path, small_pool_models: dict) -> None:
    with pytest.raises(ValueError, match="fewshot_as_multiturn needs apply_chat_template"):
        _config(small_pool, fewshot_as_multiturn=True)
    plain = small_pool_models["tokenizer"]
    assert not plain.chat_template
    with pytest.raises(UserError, match="has no chat template"):
        Evaluator(
            small_pool_models["add"],
            plain,
            _config(small_pool, apply_chat_template=True),
            Path("/tmp/evomerge-chat-none"),
        )


# --- pool.chat_template: the template of a search's merges -----------------------------------
OTHER = (
    "{% for m in messages %}{{ m['role'][0] }}>{{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}a>{% endif %}"
)
POOL_TEMPLATES = {"base": TEMPLATE, "add": OTHER, "rev": OTHER, "sort": None}
"""The templates of the search tests' pool: `auto` is OTHER, the one most of them share."""


@pytest.fixture(scope="module")
def templated_pool(small_pool: Path, tmp_path_factory) -> Path:
    """A copy of the small pool whose models carry different chat templates."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("templated") / "pool"
    shutil.copytree(small_pool, out)
    for name, template in POOL_TEMPLATES.items():
        if template is not None:
            tokenizer = AutoTokenizer.from_pretrained(str(out / name))
            tokenizer.chat_template = template
            tokenizer.save_pretrained(str(out / name))
    return out


def _search_config(pool: Path, tmp_path: Path, space="linear_global", **pool_keys) -> Path:
    import yaml
    from helpers.pool_fixtures import pool_search_config

    data = pool_search_config(
        pool,
        space=space,
        tasks=["evomerge_add"],
        subset=8,
        batch_size=32,
        search={"sampler": "random", "trials": 2, "seed": 1, "baselines": False},
        apply_chat_template=True,
    )
    data["pool"].update(pool_keys)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


CHOICES = {  # pool.chat_template -> (the template, how its prompts start, the recipe's value)
    "chatml": ("chatml", "<|im_start|>user\n", "chatml"),
    "auto": (OTHER, "u>", OTHER),
}


@pytest.mark.parametrize("choice", list(CHOICES))
def test_a_search_scores_and_exports_the_chosen_chat_template(
    choice: str, templated_pool: Path, tmp_path: Path
) -> None:
    import json

    import torch
    from transformers import AutoTokenizer

    from evomerge.cli.process import set_up_process
    from evomerge.merging.chat import model_template, resolve_chat_template
    from evomerge.merging.recipe import load_recipe
    from evomerge.results.export import export_trial
    from evomerge.search.config import load_run_config
    from evomerge.search.loop import Search
    from evomerge.search.run_folder import write_run_folder

    template, start, in_recipe = CHOICES[choice]
    text = resolve_chat_template(template, [])
    config = load_run_config(_search_config(templated_pool, tmp_path, chat_template=choice))
    run_dir = tmp_path / "run"
    torch.set_num_threads(1)
    set_up_process(threads=1, hf_home=run_dir / "hf", offline=True)
    write_run_folder(config, run_dir)
    search = Search(config, run_dir)

    # the live tokenizer renders the scoring prompts with the chosen template, not the base's
    assert search.evaluator.lm.tokenizer.chat_template == text
    prompt = search.evaluator.prepared.instances[0].args[0]
    assert prompt.startswith(start), prompt
    search.run(until=2, progress=False)
    trials = search.study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2

    out = tmp_path / "export"
    export_trial(run_dir, out, trial_number=trials[1].number)
    assert load_recipe(out / "recipe.yaml").chat_template == in_recipe
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == text
    assert model_template(out) == text.strip()
    # the exported stop tokens are the live model's
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == search.evaluator.model.generation_config.eos_token_id


@pytest.mark.parametrize(
    "space", ["ties_layers", "method_per_group", "pairwise_sequence", "dataflow"]
)
def test_every_space_kind_carries_the_chat_template_into_every_stage(
    space: str, templated_pool: Path, tmp_path: Path
) -> None:
    from evomerge.search.config import load_run_config
    from evomerge.search.run_folder import build_space

    config = load_run_config(_search_config(templated_pool, tmp_path, space, chat_template="auto"))
    built = build_space(config)
    genome = {g.name: g.choices[-1] if g.choices else g.high for g in built.genes}
    stages = built.decode(genome)
    assert stages and all(s.recipe.chat_template == OTHER for s in stages)


@pytest.mark.parametrize("value", ["chatm", "{{ nope }}"])
def test_a_bad_pool_chat_template_is_one_sentence(
    value: str, templated_pool: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    import sys

    from evomerge.cli import main

    path = _search_config(templated_pool, tmp_path, chat_template=value)
    argv = ["evomerge", "search", str(path), "--run-dir", str(tmp_path / "run")]
    monkeypatch.setattr(sys, "argv", argv)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main()
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "pool.chat_template" in lines[0], lines
    assert "did you mean 'chatml'" in lines[0] if value == "chatm" else "auto" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_pool_chat_template_may_be_scored_by_the_vllm_backend(
    templated_pool: Path, tmp_path: Path
):
    """The engine starts from a copy of the live model (tests/test_vllm.py runs it)."""
    import yaml

    from evomerge.search.config import load_run_config

    path = _search_config(templated_pool, tmp_path, chat_template="chatml")
    data = yaml.safe_load(path.read_text())
    data["fitness"]["backend"] = "vllm"
    path.write_text(yaml.safe_dump(data))
    config = load_run_config(path)
    assert (config.fitness.backend, config.pool.chat_template) == ("vllm", "chatml")
