"""The ceiling of merging on an offline pool: one model fine-tuned on all the skills' data.

    python bench/ceiling.py --pool runs/demo-pool [--run RUN_DIR | --best-merge SCORE]

The multi-task model starts from the pool's base and trains on the union of the specialists'
training data (every skill of the pool) with the specialists' schedule and learning rate and
their total step budget (number of skills x specialist steps), through the same training code
as the pool (`evomerge.pool.training`). Every model is scored on the dev split (what a search
sees) and the test split (what it never sees) and printed beside the base, each specialist,
the naive merges (uniform task arithmetic, which equals a uniform linear average; task
arithmetic with weights 1; TIES density 0.5; dare_ties 0.5/0.5) and, given a run folder (its
best trial, re-scored here) or a test score, the best merge. Last line: the share of the test
gap between the best naive model (a specialist or a naive merge) and the ceiling that the
best merge closes. Needs the fitness config's dev/test splits (`Evaluator(..., split=)`).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

CEILING_SEED = 7
CEILING = "ceiling: one model fine-tuned on all the skills"
SPLITS = ("dev", "test")


def naive_recipes(manifest: dict) -> dict[str, str]:
    """label -> mergekit recipe text of the data-free merges a user would try first."""
    base, skills = manifest["models"]["base"], list(manifest["skills"])
    n = len(skills)

    def recipe(method: str, params: dict) -> str:
        models = "".join(
            f"  - model: {manifest['models'][s]}\n    parameters: {params}\n" for s in skills
        )
        return f"merge_method: {method}\nbase_model: {base}\ndtype: float32\nmodels:\n{models}"

    return {
        f"task_arithmetic, weights 1/{n}": recipe("task_arithmetic", {"weight": round(1 / n, 6)}),
        "task_arithmetic, weights 1": recipe("task_arithmetic", {"weight": 1.0}),
        "ties, density 0.5 weight 1": recipe("ties", {"weight": 1.0, "density": 0.5}),
        "dare_ties, density 0.5 weight 0.5": recipe("dare_ties", {"weight": 0.5, "density": 0.5}),
    }


def train_ceiling(manifest: dict, base_model):
    """The base fine-tuned on every skill's training data with the specialists' total budget."""
    import torch

    from evomerge.pool import POOLS, specialist_batches
    from evomerge.pool.training import PoolSize, make_tokenizer, train

    skills = POOLS[manifest["name"]]
    spec = PoolSize(**manifest["settings"])
    model = copy.deepcopy(base_model)
    torch.manual_seed(CEILING_SEED)
    steps = len(skills) * spec.spec_steps
    batches = specialist_batches(skills, list(skills), make_tokenizer(), spec, seed=CEILING_SEED)
    started = time.perf_counter()
    train(
        model,
        batches,
        steps=steps,
        lr=spec.spec_lr,
        batch=spec.batch,
        warmup=spec.warmup,
        label="multi-task",
    )
    return model, time.perf_counter() - started


def best_trial_recipe(run_dir: Path):
    """The recipe and merge seed of the trial `evomerge export` would take from `run_dir`."""
    from evomerge.results.export import pick_trial, trial_recipe
    from evomerge.search.run_folder import build_space

    config, trial = pick_trial(run_dir)
    recipe = trial_recipe(build_space(config), trial)
    return f"best merge (trial #{trial.number})", recipe, config.search.merge_seed


def copy_weights(dst, src) -> None:
    import torch

    with torch.no_grad():
        for p, q in zip(dst.parameters(), src.parameters(), strict=True):
            p.copy_(q)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.cli.process import set_up_process
    from evomerge.fitness import Evaluator, FitnessConfig
    from evomerge.merging.executor import run_merge
    from evomerge.merging.recipe import parse_recipe
    from evomerge.pool import load_manifest

    set_up_process(threads=1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=Path, default=Path("runs/demo-pool"))
    best = parser.add_mutually_exclusive_group()
    best.add_argument("--run", type=Path, help="a search run folder: its best trial, re-scored")
    best.add_argument("--best-merge", type=float, help="the best merge's mean test score")
    args = parser.parse_args()

    manifest = load_manifest(args.pool)
    skills = manifest["skills"]
    config = FitnessConfig(
        tasks=[{"name": s["task"], "metric": s["metric"]} for s in skills.values()],
        task_paths=[manifest["task_path"]],
    )
    tokenizer = AutoTokenizer.from_pretrained(manifest["models"]["base"])

    def load(path: str):
        return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()

    base = load(manifest["models"]["base"])
    live = copy.deepcopy(base)
    rows: dict[str, dict[str, dict[str, float]]] = {split: {} for split in SPLITS}
    with tempfile.TemporaryDirectory() as tmp:
        evaluators = {s: Evaluator(live, tokenizer, config, Path(tmp) / s, split=s) for s in SPLITS}

        def score(label: str) -> None:
            for split, evaluator in evaluators.items():
                rows[split][label] = evaluator.score(full=True).per_task

        for name in ("base", *skills):
            copy_weights(live, load(manifest["models"][name]))
            score(name if name == "base" else f"specialist {name}")
        merges = [(label, parse_recipe(text), 0) for label, text in naive_recipes(manifest).items()]
        if args.run is not None:
            merges.append(best_trial_recipe(args.run))
        for index, (label, recipe, seed) in enumerate(merges):
            merged = run_merge(
                recipe, Path(tmp) / f"merge-{index}", seed=seed
            ).out_dir  # as `evomerge merge`
            copy_weights(live, load(str(merged)))
            score(label)
        ceiling, seconds = train_ceiling(manifest, base)
        copy_weights(live, ceiling)
        score(CEILING)

    print(f"pool {args.pool} ({manifest['name']}); the ceiling trained in {seconds:.0f} s")
    for split in SPLITS:
        print_table(f"{split} split", skills, rows[split])
    means = {label: mean(r) for label, r in rows["test"].items()}
    naive = {k: v for k, v in means.items() if k != "base" and not k.startswith(("best", "ceil"))}
    best_naive = max(naive, key=naive.get)
    top = (
        args.best_merge
        if args.best_merge is not None
        else next((v for k, v in means.items() if k.startswith("best merge")), None)
    )
    ceiling_mean = means[CEILING]
    print(
        f"test: best naive model {best_naive} {naive[best_naive]:.3f}; ceiling {ceiling_mean:.3f}"
    )
    if top is not None:
        gap = ceiling_mean - naive[best_naive]
        share = (top - naive[best_naive]) / gap if gap > 0 else float("nan")
        print(f"test: best merge {top:.3f} closes {100 * share:.0f}% of that gap")


def mean(row: dict[str, float]) -> float:
    return sum(row.values()) / len(row)


def print_table(title: str, skills: dict, rows: dict[str, dict[str, float]]) -> None:
    tasks = [s["task"] for s in skills.values()]
    header = " | ".join(f"{s['task']} ({s['metric']})" for s in skills.values())
    print(f"\n{title}\n\n| model | {header} | mean |")
    print("|---" * (len(tasks) + 2) + "|")
    for label, r in rows.items():
        print(f"| {label} | {' | '.join(f'{r[t]:.3f}' for t in tasks)} | {mean(r):.3f} |")
    print()


if __name__ == "__main__":
    main()
