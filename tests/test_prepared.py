"""Requests built once (`fitness.prepared`) score exactly as `lm_eval.evaluator.evaluate` does.

Real lm-eval, real tiny pool models: every bundled task of both demo pools (loglikelihood and
generate-until), a task with a filter pipeline, a multiple-choice task whose one-token choices
share one forward pass (HFLM's logits cache), per example and aggregated, full set, subset and
chosen documents, for the base model, a specialist and a merged average.
"""

from __future__ import annotations

import copy
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from evomerge.errors import UserError
from evomerge.fitness import Evaluator, FitnessConfig
from evomerge.fitness.backends import make_lm
from evomerge.fitness.tasks import build_task_set
from evomerge.pool import load_manifest

# A generate-until task whose answer goes through a regex filter: its metric key is
# `exact_match,strict-match`, and the filter sees what the model generated.
FILTERED = """\
task: evomerge_shift_filtered
dataset_path: json
dataset_kwargs:
  data_files:
    dev: {data}
test_split: dev
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 12
  do_sample: false
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "([a-z]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

# Ten one-token choices on one context: HFLM scores them from one forward pass.
MULTIPLE_CHOICE = """\
task: evomerge_add_first_digit
dataset_path: json
dataset_kwargs:
  data_files:
    dev: {data}
test_split: dev
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
doc_to_target: "{{{{answer[0]}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def _models(models: dict, specialist: str) -> dict:
    """base, a specialist and the plain average of every model of the pool."""
    average = copy.deepcopy(models["base"])
    others = [m for name, m in models.items() if name not in ("tokenizer",)]
    with torch.no_grad():
        for name, p in average.named_parameters():
            p.copy_(sum(dict(m.named_parameters())[name] for m in others) / len(others))
    return {"base": models["base"], specialist: models[specialist], "average": average}


def _hf_lm(model, tokenizer, config: FitnessConfig):
    return make_lm(
        "hf", model, tokenizer, batch_size=config.batch_size, max_length=config.max_length
    )


def _reference(lm, config: FitnessConfig, run_dir: Path, samples=None) -> dict:
    """lm-eval's own `evaluate` of `lm` over freshly built tasks: {task: (results row, samples)}."""
    from lm_eval.evaluator import evaluate

    tasks = build_task_set(config, run_dir)
    out = evaluate(
        lm=lm,
        task_dict=tasks.task_dict,
        samples=samples,
        cache_requests=False,
        bootstrap_iters=0,
        log_samples=True,
    )
    return {name: (out["results"][name], out["samples"][name]) for name in tasks.leaf_tasks}


def _per_doc(rows: list[dict], metric_key: str) -> dict[int, float]:
    metric, _, filter_name = metric_key.partition(",")
    return {r["doc_id"]: float(r[metric]) for r in rows if r["filter"] == filter_name}


def _assert_same(evaluator: Evaluator, lm, tmp_path: Path) -> None:
    """Full set, subset and chosen documents: equal to lm-eval's `evaluate` of `lm` (an LM over
    the same model), metric by metric, bit for bit."""
    config = evaluator.config
    full = evaluator.score(full=True, per_example=True)
    reference = _reference(lm, config, tmp_path / "ref-full")
    for spec in evaluator.tasks.specs:
        row, rows = reference[spec.name]
        numeric = {k: float(v) for k, v in row.items() if "," in k and "_stderr," not in k}
        assert full.metrics[spec.name] == numeric, spec.name
        per_doc = _per_doc(rows, spec.metric_key)
        assert full.per_example[spec.name] == [per_doc[d] for d in range(len(per_doc))], spec.name

    subset = evaluator.score()
    reference = _reference(lm, config, tmp_path / "ref-subset", samples=evaluator.tasks.subset)
    assert subset.per_task == {
        s.name: float(reference[s.name][0][s.metric_key]) for s in evaluator.tasks.specs
    }

    chosen = {s.name: [7, 2, 11] for s in evaluator.tasks.specs}
    got = evaluator.score_examples(chosen)
    reference = _reference(
        lm, config, tmp_path / "ref-chosen", samples={t: sorted(d) for t, d in chosen.items()}
    )
    for spec in evaluator.tasks.specs:
        per_doc = _per_doc(reference[spec.name][1], spec.metric_key)
        assert got[spec.name] == [per_doc[d] for d in chosen[spec.name]], spec.name


@pytest.mark.parametrize("which", ["base", "add", "average"])
def test_demo_tasks_score_as_lm_eval(
    which: str, small_pool: Path, small_pool_models: dict, tmp_path: Path
) -> None:
    model = _models(small_pool_models, "add")[which]
    tokenizer = small_pool_models["tokenizer"]
    manifest = load_manifest(small_pool)
    config = FitnessConfig(
        tasks=manifest["tasks"],
        task_paths=[manifest["task_path"]],
        subset={"count": 20},
        batch_size=16,
    )
    _assert_same(
        Evaluator(model, tokenizer, config, tmp_path / "run"),
        _hf_lm(model, tokenizer, config),
        tmp_path,
    )


@pytest.mark.parametrize("which", ["base", "shift", "average"])
def test_demo2_tasks_with_generation_score_as_lm_eval(
    which: str, small_pool2: Path, small_pool2_models: dict, tmp_path: Path
) -> None:
    model = _models(small_pool2_models, "shift")[which]
    tokenizer = small_pool2_models["tokenizer"]
    manifest = load_manifest(small_pool2)
    config = FitnessConfig(
        tasks=manifest["tasks"],
        task_paths=[manifest["task_path"]],
        subset={"count": 20},
        batch_size=16,
    )
    evaluator = Evaluator(model, tokenizer, config, tmp_path / "run")
    assert [s.metric for s in evaluator.tasks.specs] == [
        "exact_match",
        "acc",
        "acc",
    ]  # the single-metric default
    _assert_same(evaluator, _hf_lm(model, tokenizer, evaluator.config), tmp_path)


def _extra_tasks(pool: Path, tmp_path: Path) -> Path:
    """A folder with the filtered task (over demo2's shift data) and the multiple-choice one
    (the first digit of demo2's sub answers)."""
    folder = tmp_path / "extra"
    folder.mkdir()
    data = Path(load_manifest(pool)["task_path"]) / "data"
    (folder / "filtered.yaml").write_text(FILTERED.format(data=data / "shift_dev.jsonl"))
    (folder / "choice.yaml").write_text(MULTIPLE_CHOICE.format(data=data / "sub_dev.jsonl"))
    return folder


@pytest.mark.parametrize("which", ["shift", "average"])
def test_a_filtered_task_and_a_multiple_choice_task_score_as_lm_eval(
    which: str, small_pool2: Path, small_pool2_models: dict, tmp_path: Path
) -> None:
    model = _models(small_pool2_models, "shift")[which]
    tokenizer = small_pool2_models["tokenizer"]
    config = FitnessConfig(
        tasks=["evomerge_shift_filtered", "evomerge_add_first_digit"],
        task_paths=[_extra_tasks(small_pool2, tmp_path)],
        subset={"count": 20},
        batch_size=16,
    )
    evaluator = Evaluator(model, tokenizer, config, tmp_path / "run")
    assert [s.metric_key for s in evaluator.tasks.specs] == ["exact_match,strict-match", "acc,none"]
    _assert_same(evaluator, _hf_lm(model, tokenizer, evaluator.config), tmp_path)


def test_scoring_prints_nothing(
    small_pool: Path, small_pool_models: dict, tmp_path: Path, capfd
) -> None:
    """lm-eval's progress bars and logs stay out of every trial's scoring."""
    manifest = load_manifest(small_pool)
    config = FitnessConfig(
        tasks=manifest["tasks"], task_paths=[manifest["task_path"]], subset={"count": 5}
    )
    evaluator = Evaluator(
        small_pool_models["base"], small_pool_models["tokenizer"], config, tmp_path
    )
    capfd.readouterr()
    evaluator.score()
    evaluator.score_examples({"evomerge_add": [3, 1]})
    assert capfd.readouterr() == ("", "")


def test_metric_choices_are_resolved_or_refused_in_one_sentence(
    small_pool2: Path, small_pool2_models: dict, tmp_path: Path
) -> None:
    model, tok = small_pool2_models["base"], small_pool2_models["tokenizer"]
    folder = _extra_tasks(small_pool2, tmp_path)
    for name in ("sub_dev.jsonl", "shift_dev.jsonl"):
        shutil.copyfile(
            Path(load_manifest(small_pool2)["task_path"]) / "data" / name, tmp_path / name
        )
    (folder / "two.yaml").write_text(
        FILTERED.replace("evomerge_shift_filtered", "evomerge_two_filters")
        .replace(
            "filter_list:\n",
            "filter_list:\n  - name: loose\n    filter:\n      - function: take_first\n",
        )
        .format(data=tmp_path / "shift_dev.jsonl")
    )
    (folder / "norm.yaml").write_text(
        MULTIPLE_CHOICE.replace("evomerge_add_first_digit", "evomerge_norm")
        .replace("metric: acc\n", "metric: acc_bytes\n")
        .format(data=folder.parent / "sub_dev.jsonl")
    )

    def spec_of(spec):
        return Evaluator(
            model, tok, FitnessConfig(tasks=[spec], task_paths=[folder]), tmp_path / "run"
        ).tasks.specs[0]

    assert spec_of("evomerge_add_first_digit").metric == "acc"  # acc among several
    assert (
        spec_of({"name": "evomerge_two_filters", "metric": "exact_match,loose"}).metric_key
        == "exact_match,loose"
    )
    with pytest.raises(
        UserError, match=r"filters its answers several ways \(loose, strict-match\); name one"
    ):
        spec_of("evomerge_two_filters")
    with pytest.raises(UserError, match="has no filter 'lenient'; it has strict-match"):
        spec_of({"name": "evomerge_shift_filtered", "metric": "exact_match,lenient"})
    with pytest.raises(
        UserError, match=r"reports several metrics \(acc_bytes, acc_norm\); name the one"
    ):
        spec_of("evomerge_norm")


def test_a_group_is_refused_in_one_sentence(
    small_pool: Path, small_pool_models: dict, tmp_path: Path
) -> None:
    folder = tmp_path / "group"
    folder.mkdir()
    (folder / "g.yaml").write_text(
        textwrap.dedent("""\
        group: evomerge_both
        task: [evomerge_add, evomerge_rev]
    """)
    )
    config = FitnessConfig(
        tasks=["evomerge_both"], task_paths=[load_manifest(small_pool)["task_path"], folder]
    )
    with pytest.raises(
        UserError, match="'evomerge_both' is a group, not a task; list its tasks one by one"
    ):
        Evaluator(
            small_pool_models["base"], small_pool_models["tokenizer"], config, tmp_path / "run"
        )
