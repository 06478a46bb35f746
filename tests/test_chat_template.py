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
