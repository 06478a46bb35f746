"""Held-out data of a pool's skills, split into dev and test, written as lm-eval tasks.

Each skill's held-out prompts are distinct and disjoint from every training example. The first
`N_DEV` go to `dev` (what a search scores) and the next `N_TEST` to `test` (only for reports).
Each task YAML names both files, with `validation_split: dev` and `test_split: test`; the
fitness config chooses which split is scored.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from evomerge.pool.skills import Skill

TASK_PREFIX = "evomerge_"  # lm-eval task names: evomerge_add, evomerge_shift, ...
N_DEV = 150
N_TEST = 250
SPLIT_SEED = 1234
SPLITS = ("dev", "test")
STOP = "."  # every answer ends in it in training; generate-until tasks stop on it


def held_out(skill: Skill, n_dev: int = N_DEV, n_test: int = N_TEST) -> dict[str, list[dict]]:
    """{"dev": docs, "test": docs} of one skill: distinct prompts, fixed by `SPLIT_SEED`."""
    rng = random.Random(f"{SPLIT_SEED}-{skill.name}")
    seen: set[str] = set()
    docs: list[dict[str, str]] = []
    while len(docs) < n_dev + n_test:
        prompt, answer = skill.generate(rng)
        if prompt not in seen:
            seen.add(prompt)
            docs.append({"prompt": prompt, "answer": answer})
    return {"dev": docs[:n_dev], "test": docs[n_dev:]}


def held_out_prompts(skills: dict[str, Skill]) -> set[str]:
    """Every dev and test prompt of `skills`: what training must never see."""
    return {d["prompt"] for s in skills.values() for docs in held_out(s).values() for d in docs}


def task_name(skill: Skill) -> str:
    return TASK_PREFIX + skill.name


def _scoring_yaml(skill: Skill) -> str:
    """The part of a task YAML that says how a model is scored on the skill."""
    if skill.output_type == "generate_until":
        return (
            "output_type: generate_until\n"
            'doc_to_text: "{{prompt}}"\n'
            'doc_to_target: "{{answer}}"\n'
            "generation_kwargs:\n"
            f'  until: ["{STOP}"]\n'
            "  max_gen_toks: 12\n"  # the longest answer is 8 letters; the models' window is 64
            "  do_sample: false\n"
            "metric_list:\n"
            "  - metric: exact_match\n"
            "    aggregation: mean\n"
            "    higher_is_better: true\n"
        )
    return (
        "output_type: loglikelihood\n"
        'doc_to_text: "{{prompt}}"\n'
        f'doc_to_target: "{{{{answer}}}}{STOP}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "  - metric: perplexity\n"
        "    aggregation: perplexity\n"
        "    higher_is_better: false\n"
    )


def write_tasks(
    task_dir: Path,
    pool_name: str,
    skills: dict[str, Skill],
    *,
    n_dev: int = N_DEV,
    n_test: int = N_TEST,
) -> list[str]:
    """Write one lm-eval task YAML per skill plus its dev and test data; return the task names.

    `data_files` are relative to the YAML file (evomerge's evaluator resolves them so). A
    loglikelihood task scores the greedy match of "answer." (`acc`) and its perplexity; a
    generate-until task generates greedily until "." and scores `exact_match` of the answer.
    """
    task_dir = Path(task_dir)
    (task_dir / "data").mkdir(parents=True, exist_ok=True)
    names = []
    for skill in skills.values():
        files = {}
        for split, docs in held_out(skill, n_dev, n_test).items():
            files[split] = f"data/{skill.name}_{split}.jsonl"
            with open(task_dir / files[split], "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(doc) + "\n" for doc in docs)
        yaml_text = (
            f"# evomerge {pool_name} skill '{skill.name}': {skill.description}\n"
            f"# Written by evomerge.pool.tasks.write_tasks; data_files are relative to this file.\n"
            f"# dev: what a search scores; test: only for reports (the fitness config picks).\n"
            f"task: {task_name(skill)}\n"
            f"tag: evomerge_{pool_name}\n"
            f"dataset_path: json\n"
            f"dataset_kwargs:\n"
            f"  data_files:\n"
            f"    dev: {files['dev']}\n"
            f"    test: {files['test']}\n"
            f"validation_split: dev\n"
            f"test_split: test\n" + _scoring_yaml(skill) + "metadata:\n  version: 2.0\n"
        )
        (task_dir / f"{task_name(skill)}.yaml").write_text(yaml_text, encoding="utf-8")
        names.append(task_name(skill))
    return names


def repo_task_dir() -> Path | None:
    """The `eval_tasks/` folder of a source checkout, if this package runs from one."""
    candidate = Path(__file__).resolve().parents[2] / "eval_tasks"
    return candidate if candidate.is_dir() else None
