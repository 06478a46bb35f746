"""Search quality on any pool: samplers x spaces x seeds, chosen on dev, reported on test.

    python bench/search_quality.py --pool runs/demo-pool \\
        --spaces dare_ties_global task_arithmetic_layers \\
        --samplers cmaes cmaes_warm gp tpe random --seeds 0 1 2 --trials 50 --jobs 8 \\
        --out results.json

A pool is a folder with `pool.json` (as `evomerge pool` writes it: base, models, task_path, tasks,
and each skill's metric). Each (space, sampler, seed) is a fresh study (baselines queued first,
every trial scored on the full dev split, no subset) run in its own process, `--jobs` at a time. Its
best trial, chosen on dev as `evomerge export` would, is then scored once on the test split. The
references are chosen and scored the same way: each specialist alone (the best chosen on dev) and
each naive recipe (a uniform average, DARE-TIES 0.5/0.5, task arithmetic with weight 1). The table
prints, per sampler x space, the mean and the worst seed of the chosen trial's test score minus the
best specialist's and minus each naive recipe's, in points (x100). Tasks with one split are scored
on it for both roles (the JSON says so: `held_out`).
`--spaces ps+dataflow` runs the two linked studies of the README at the same total budget: half
the trials over `task_arithmetic_layers`, its winner merged and added to the pool, then half over
the data-flow space.

`--out` writes every run (test and dev scores, per task too, the chosen trial and its genes,
seconds, sampler seconds per trial) and the references as JSON; `--combine A.json B.json ...`
prints one table from several such files of one pool.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name -> (a space, and the gene values of the recipe: per parameter, or per model as a dict)
NAIVE_RECIPES = {
    "average": ({"method": "linear", "search": {"weight": [0.0, 1.0]}}, "uniform"),
    "dare_ties_0.5": ("dare_ties_global", "dare_ties_0.5"),
    "task_arithmetic_1.0": (
        {"method": "task_arithmetic", "search": {"weight": [0.0, 1.0]}},
        {"weight": 1.0},
    ),
    "ties_0.5": (
        {"method": "ties", "search": {"weight": [0.0, 1.0], "density": [0.0, 1.0]}},
        {"weight": 1.0, "density": 0.5},
    ),
}


def pool_tasks(manifest: dict) -> list:
    """The pool's tasks, each with the metric its skill names (exact_match for generate-until
    tasks; a manifest without metrics: lm-eval's `acc`)."""
    metrics = {s["task"]: s["metric"] for s in manifest.get("skills", {}).values() if "metric" in s}
    return [{"name": t, "metric": metrics[t]} if t in metrics else t for t in manifest["tasks"]]


def pool_config(pool: Path, space, sampler: str, seed: int, trials: int) -> dict:
    manifest = json.loads((pool / "pool.json").read_text())
    models = {  # `base+adapter` (a LoRA pool): each part in the pool's folder
        name: "+".join(str(pool / part) for part in path.split("+"))
        for name, path in manifest["models"].items()
        if name != "base"
    }
    return {
        "pool": {"base": str(pool / manifest["base"]), "models": models, "dtype": "float32"},
        "space": space,
        "fitness": {
            "task_paths": [str(pool / manifest["task_path"])],
            "tasks": pool_tasks(manifest),
        },
        "search": {"sampler": sampler, "trials": trials, "seed": seed, "fidelity": None},
        "threads": 1,
    }


def _setup(threads: int = 1):
    from evomerge.cli.process import set_up_process

    set_up_process(threads=threads)


def sampler_seconds(trials) -> float:
    """Mean seconds per trial spent outside merging and scoring: the sampler's proposal, and
    the study's bookkeeping (the same for every sampler; compare with `random`)."""
    spent = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        - t.user_attrs["merge_seconds"]
        - t.user_attrs["eval_seconds"]
        for t in trials
    ]
    return statistics.mean(spent) if spent else 0.0


# `--spaces ps+dataflow`: a parameter-space search, then a data-flow search over the pool and
# its winner, each with half of the trials (the two linked studies the README describes).
TWO_STAGE = {"ps+dataflow": ("task_arithmetic_layers", "dataflow")}


def run_search(job: dict) -> dict:
    """One study (or the two of a TWO_STAGE space): search on dev, then score the chosen trial
    on dev and test."""
    _setup()
    from evomerge.results.heldout import HeldOut
    from evomerge.search.config import RunConfig

    name = Path(str(job["space"])).stem
    run_dir = Path(job["workdir"]) / f"{name}-{job['sampler']}-{job['seed']}"
    data = pool_config(Path(job["pool"]), job["space"], job["sampler"], job["seed"], job["trials"])
    started = time.perf_counter()
    if job["space"] in TWO_STAGE:
        data = second_stage(data, run_dir, *TWO_STAGE[job["space"]], job["trials"] // 2)
    config = RunConfig.model_validate(data)
    best, done = search(config, run_dir, config.search.trials)
    seconds = time.perf_counter() - started
    held = HeldOut(config, run_dir)
    scores = held.describe(held.score(best.params))
    return {
        **{k: job[k] for k in ("space", "sampler", "seed", "trials")},
        "space": name,
        "best_trial": best.number,
        "best_is_baseline": best.user_attrs.get("baseline"),
        "best_params": best.params,  # a staged space's choices: the order, each group's method
        "search_dev": max(t.value for t in done),
        "dev": scores["dev"]["value"],
        "test": scores["test"]["value"],
        "test_se": scores["test"]["se"],
        "per_task": {split: scores[split]["per_task"] for split in ("dev", "test")},
        "params": best.params,
        "seconds": seconds,
        "sampler_seconds_per_trial": sampler_seconds(
            [t for t in done if "baseline" not in t.user_attrs]
        ),
        "held_out": held.held_out,
    }


def search(config, run_dir: Path, trials: int):
    """A fresh study of `trials` trials in `run_dir`: its best trial and its complete trials."""
    from evomerge.search.loop import Search
    from evomerge.search.run_folder import write_run_folder
    from evomerge.search.study import best_trial

    write_run_folder(config, run_dir)
    study = Search(config, run_dir)
    study.run(until=trials, progress=False)
    return best_trial(study.study), [t for t in study.study.trials if t.state.name == "COMPLETE"]


def second_stage(
    data: dict, run_dir: Path, first_space: str, second_space: str, first_trials: int
) -> dict:
    """Run the first study on `first_space`, merge its winner, and return the config of the
    second study: the pool plus that winner (as `ps`), over `second_space`."""
    from evomerge.merging.executor import run_merge
    from evomerge.results.export import trial_recipe
    from evomerge.search.config import RunConfig
    from evomerge.search.run_folder import build_space

    first = RunConfig.model_validate(
        {**data, "space": first_space, "search": {**data["search"], "trials": first_trials}}
    )
    best, _ = search(first, run_dir / "ps", first_trials)
    run_merge(
        trial_recipe(build_space(first), best), run_dir / "ps-best", seed=first.search.merge_seed
    )
    pool = {**data["pool"], "models": {**data["pool"]["models"], "ps": str(run_dir / "ps-best")}}
    trials = data["search"]["trials"] - first_trials
    return {
        **data,
        "pool": pool,
        "space": second_space,
        "search": {**data["search"], "trials": trials},
    }


def score_references(pool: str, workdir: str) -> dict:
    """Each specialist alone and each naive recipe, on dev and test."""
    _setup()
    from evomerge.results.heldout import HeldOut
    from evomerge.search.config import RunConfig
    from evomerge.search.run_folder import build_space

    config = RunConfig.model_validate(pool_config(Path(pool), "dare_ties_global", "random", 0, 1))
    held = HeldOut(config, Path(workdir) / "references")
    out = {"specialists": {}, "naive": {}, "held_out": held.held_out}
    space = build_space(config)
    for label, genome in space.baselines().items():
        if label.startswith("only_"):  # weight 1, density 1: the specialist itself
            out["specialists"][label.removeprefix("only_")] = _values(held, genome)
    for name, (space_source, values) in NAIVE_RECIPES.items():
        recipe_config = config.model_copy(update={"space": space_source})
        recipe_space = build_space(recipe_config)
        genome = (
            recipe_space.baselines()[values]
            if isinstance(values, str)
            else {g.name: values[g.param] for g in recipe_space.genes}
        )
        out["naive"][name] = _values(HeldOut(recipe_config, Path(workdir) / "references"), genome)
    return out


def _values(held, genome) -> dict:
    scores = held.describe(held.score(genome))
    return {split: scores[split]["value"] for split in ("dev", "test")}


def margins(runs: list[dict], references: dict) -> dict:
    """Test-score margins (points) of each sampler x space: over the best specialist (chosen
    on dev) and over each naive recipe; mean and worst seed."""
    specialists = references["specialists"]
    best_specialist = max(specialists, key=lambda m: specialists[m]["dev"])
    rivals = {f"specialist ({best_specialist})": specialists[best_specialist]["test"]}
    rivals.update({name: r["test"] for name, r in references["naive"].items()})
    cells: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        cells.setdefault((run["sampler"], run["space"]), []).append(run)
    table = {}
    for key, cell in sorted(cells.items()):
        tests = [r["test"] for r in cell]
        table[key] = {
            "dev_mean": statistics.mean(r["dev"] for r in cell),
            "test_mean": statistics.mean(tests),
            "seeds": len(tests),
            "vs": {
                name: {"mean": 100 * (statistics.mean(tests) - v), "min": 100 * (min(tests) - v)}
                for name, v in rivals.items()
            },
        }
    return table


def print_table(table: dict, references: dict, trials: int) -> None:
    rivals = list(next(iter(table.values()))["vs"])
    print(f"\ntest score minus rival, points, chosen on dev ({trials} trials; mean / worst seed)")
    header = ["sampler", "space", "dev", "test"] + rivals
    rows = [
        [sampler, space, f"{row['dev_mean']:.4f}", f"{row['test_mean']:.4f}"]
        + [f"{row['vs'][r]['mean']:+.1f} / {row['vs'][r]['min']:+.1f}" for r in rivals]
        for (sampler, space), row in table.items()
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for line in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)))
    print("\nreferences (dev / test):")
    for group in ("specialists", "naive"):
        for name, r in references[group].items():
            print(
                f"  {group[:-1] if group == 'specialists' else 'naive'} {name}: {r['dev']:.4f} / "
                f"{r['test']:.4f}"
            )
    if not all(references["held_out"].values()):
        one = [t for t, h in references["held_out"].items() if not h]
        print(f"note: {', '.join(one)} have one split: dev and test are the same examples")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=Path, default=Path("runs/demo-pool"))
    parser.add_argument(
        "--spaces", nargs="+", default=["task_arithmetic_layers", "dare_ties_layers"]
    )
    parser.add_argument(
        "--samplers", nargs="+", default=["cmaes", "cmaes_warm", "gp", "tpe", "random"]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument(
        "--jobs", type=int, default=1, help="independent runs in parallel processes"
    )
    parser.add_argument("--out", type=Path, help="write every run and the references as JSON")
    parser.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="print one table from the --out files of runs on one pool, and run nothing",
    )
    args = parser.parse_args()
    if args.combine:
        return print_combined(args.combine)
    pool = args.pool.resolve()
    if not (pool / "pool.json").is_file():
        parser.error(f"{pool} has no pool.json")

    with (
        tempfile.TemporaryDirectory() as tmp,
        ProcessPoolExecutor(max_workers=args.jobs) as workers,
    ):
        pending_references = workers.submit(score_references, str(pool), tmp)
        # Seeds outermost: a run cut short still has every sampler x space at its first seeds.
        jobs = [
            {
                "pool": str(pool),
                "space": space,
                "sampler": sampler,
                "seed": seed,
                "trials": args.trials,
                "workdir": tmp,
            }
            for seed in args.seeds
            for space in args.spaces
            for sampler in args.samplers
        ]
        runs, references = [], None
        for done in as_completed(
            [workers.submit(run_search, job) for job in jobs] + [pending_references]
        ):
            if done is pending_references:
                references = done.result()
            else:
                run = done.result()
                print(
                    f"{run['sampler']:>10} {run['space']:<24} seed {run['seed']}: "
                    f"dev {run['dev']:.4f} test {run['test']:.4f} (trial {run['best_trial']}"
                    f"{', a baseline' if run['best_is_baseline'] else ''}; {run['seconds']:.0f} s, "
                    f"sampler {run['sampler_seconds_per_trial']:.2f} s/trial)",
                    flush=True,
                )
                runs.append(run)
            if args.out:  # after every run, so that a run stopped early keeps what it measured
                write_results(args.out, pool, args.trials, runs, references)
    table = margins(runs, references)
    print_table(table, references, args.trials)
    if args.out:
        write_results(args.out, pool, args.trials, runs, references, table)
        print(f"wrote {args.out}")


def print_combined(paths: list[Path]) -> None:
    """One table from several --out files of one pool: every run, and the references of the
    file that scored the most naive recipes (runs are scored the same way in each)."""
    results = [json.loads(p.read_text()) for p in paths]
    pools = {r["pool"] for r in results}
    if len(pools) > 1:
        sys.exit(f"--combine: the files are runs on {len(pools)} pools; give one pool's")
    runs = [run for r in results for run in r["runs"]]
    references = max(
        (r["references"] for r in results if r["references"]), key=lambda ref: len(ref["naive"])
    )
    print(f"pool {pools.pop()}: {len(runs)} runs from {len(paths)} files")
    print_table(margins(runs, references), references, results[0]["trials"])


def write_results(path: Path, pool: Path, trials: int, runs: list, references, table=None) -> None:
    rows = [{"sampler": s, "space": sp, **row} for (s, sp), row in (table or {}).items()]
    path.write_text(
        json.dumps(
            {
                "pool": str(pool),
                "trials": trials,
                "runs": runs,
                "references": references,
                "table": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
