"""Learned merging: the black-box best against the same study's gradient-refined trial.

    python bench/refine_quality.py --pools runs/demo-pool runs/demo2-pool runs/demo3-pool \\
        --space task_arithmetic_layers --seeds 0 1 2 --trials 50 --jobs 2 --out refine.json

Each (pool, seed) is one fresh study (baselines first, every trial on all of dev, `gp`) with
`search.refine: gradient`: `trials` black-box trials, then the refined trial of the best one,
in the same study. Both are scored on every dev and test example (`HeldOut`, as `evomerge
report` does) with the paired test difference and its standard error. The naive references
are chosen as in bench/search_quality.py; the ceiling (multi-task fine-tune) is the test mean
`bench/ceiling.py` measured for each pool (docs/BENCHMARKS.md, "The offline pools"), or
`--ceiling POOL=VALUE`. Printed per pool: the share of the gap between the best naive recipe
(on test) and the ceiling that each closes, mean and worst seed; the dev-to-test drop of each;
the refinement's cost (forward+backward example passes, seconds, trial-equivalents: its seconds
over the mean seconds of a black-box trial). `--oracle` also refines the black-box best on the
test split itself (train and early-stopping folds both from test): the share of the gap that
per-tensor weights can reach at all, what limits a pool where the refinement falls short.
`--objective entropy` refines by AdaMerging's unsupervised entropy instead of the answer NLL
(`search.refine.objective`; its held-out fold reads entropy, so the fold column shows n/a).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Test means of the multi-task fine-tune, `bench/ceiling.py` on the builds of 2026-12-07
# (docs/BENCHMARKS.md, "Learned merging"); --ceiling POOL=VALUE for another build.
CEILINGS = {"demo": 0.981, "demo2": 0.960, "demo3": 0.911}


def run_one(job: dict) -> dict:
    """One study with refinement; the black-box best and the refined trial on dev and test."""
    from search_quality import _setup, pool_config

    _setup()
    from evomerge.results.heldout import HeldOut
    from evomerge.search.config import RunConfig
    from evomerge.search.loop import Search
    from evomerge.search.run_folder import write_run_folder
    from evomerge.search.study import best_trial
    from evomerge.spaces.refine import REFINED_ATTR

    pool = Path(job["pool"])
    data = pool_config(pool, job["space"], "gp", job["seed"], job["trials"])
    data["search"]["refine"] = job["refine"]
    config = RunConfig.model_validate(data)
    run_dir = Path(job["workdir"]) / f"{pool.name}-{job['space']}-{job['seed']}"
    write_run_folder(config, run_dir)
    started = time.perf_counter()
    search = Search(config, run_dir)
    statistics_seconds = search.statistics_seconds  # RegMean spaces: collected at start-up
    search.run(until=job["trials"], progress=False)
    seconds = time.perf_counter() - started
    trials = [t for t in search.study.trials if t.state.name == "COMPLETE"]
    refined = next(t for t in trials if REFINED_ATTR in t.user_attrs)
    black_box = best_trial(search.study, [t for t in trials if t is not refined])
    held = HeldOut(config, run_dir)
    scores = {
        "black_box": held.score(black_box.params),
        "refined": held.score(refined.params, refined.user_attrs),
    }
    if job[
        "oracle"
    ]:  # the same refinement fitted on test itself: what per-tensor weights can reach
        from evomerge.search.refine import Refiner

        oracle = Refiner(
            config.search.refine, held.candidate, held.evaluators["test"], held.space, seed=0
        ).refine(black_box.params)
        scores["oracle"] = held.score(black_box.params, {REFINED_ATTR: oracle.weights})
    described = {k: held.describe(v) for k, v in scores.items()}
    paired = held.compare(scores["refined"], scores["black_box"])
    per_trial = [
        t.user_attrs["merge_seconds"] + t.user_attrs["eval_seconds"]
        for t in trials
        if t is not refined
    ]
    stats = refined.user_attrs["refine"]
    return {
        "pool": pool.name,
        "space": job["space"],
        "seed": job["seed"],
        "trials": job["trials"],
        "seconds": seconds,
        "black_box_trial": black_box.number,
        "refined_from": stats["from_trial"],
        **{
            f"{k}_{split}": described[k][split]["value"]
            for k in described
            for split in ("dev", "test")
        },
        "paired_test": paired["test"],
        "paired_dev": paired["dev"],
        "refine": stats,
        "trial_seconds": statistics.mean(per_trial),
        "trial_equivalents": stats["seconds"] / statistics.mean(per_trial),
        "statistics_seconds": statistics_seconds,
        "statistics_trials": statistics_seconds / statistics.mean(per_trial),
    }


def references(pool: str, workdir: str) -> dict:
    from search_quality import score_references

    out = score_references(pool, workdir)
    out["envelope"] = envelope(pool, workdir)
    return out


def envelope(pool: str, workdir: str) -> float:
    """The specialists' envelope on test: per task the best single model's score, averaged.
    A merge that kept every skill at its best model's level would score this; where it lies
    below the ceiling, the specialists themselves limit what any merge of them can close."""
    from search_quality import _setup, pool_config

    _setup()
    from evomerge.results.heldout import HeldOut
    from evomerge.search.config import RunConfig
    from evomerge.search.run_folder import build_space

    config = RunConfig.model_validate(pool_config(Path(pool), "dare_ties_global", "random", 0, 1))
    held = HeldOut(config, Path(workdir) / "envelope")
    best: dict[str, float] = {}
    for label, genome in build_space(config).baselines().items():
        if label.startswith("only_"):
            per_task = held.describe(held.score(genome))["test"]["per_task"]
            for task, value in per_task.items():
                best[task] = max(best.get(task, 0.0), value)
    return statistics.mean(best.values())


def summarise(runs: list[dict], refs: dict[str, dict], ceilings: dict[str, float]) -> None:
    """Per pool: test scores, gap closed (mean / worst seed), drops, cost."""
    print(
        "\n| pool | seeds | best naive (test) | ceiling | black-box test | refined test "
        "| gap closed: black-box | gap closed: refined | refined - black-box, test (paired ± se) "
        "| dev-to-test drop: black-box / refined | refinement cost | statistics cost "
        "| specialists' envelope (gap it closes) |"
    )
    print("|---" * 13 + "|")
    for pool in sorted({r["pool"] for r in runs}):
        mine = sorted((r for r in runs if r["pool"] == pool), key=lambda r: r["seed"])
        naive = max(v["test"] for v in refs[pool]["naive"].values())
        ceiling = ceilings[pool]

        def closed(key: str, mine=mine, naive=naive, ceiling=ceiling) -> str:
            shares = [(r[key] - naive) / (ceiling - naive) for r in mine]
            return f"{100 * statistics.mean(shares):.0f}% / {100 * min(shares):.0f}%"

        def mean(key: str, mine=mine) -> float:
            return statistics.mean(r[key] for r in mine)

        paired = " ; ".join(
            f"{100 * r['paired_test']['difference']:+.1f}±{100 * r['paired_test']['se']:.1f}"
            for r in mine
        )
        drop_bb = mean("black_box_dev") - mean("black_box_test")
        drop_rf = mean("refined_dev") - mean("refined_test")
        if mine[0]["refine"].get("objective", "nll") == "nll":
            fold = statistics.mean(
                r["refine"]["held_out_start"] - r["black_box_test"] for r in mine
            )
            fold_rf = statistics.mean(
                r["refine"]["held_out_refined"] - r["refined_test"] for r in mine
            )
            folds = f"{100 * fold:+.1f} / {100 * fold_rf:+.1f}"
        else:  # the fold's score is minus its entropy, not a metric
            folds = "n/a"
        cost = (
            f"{statistics.mean(r['refine']['train_passes'] for r in mine):.0f} fwd+bwd, "
            f"{statistics.mean(r['refine']['seconds'] for r in mine):.0f} s, "
            f"{statistics.mean(r['trial_equivalents'] for r in mine):.0f} trials"
        )
        if "oracle_test" in mine[0]:
            print(f"{pool}: per-tensor oracle (refined on test) closes {closed('oracle_test')}")
        print(
            f"| {pool} | {len(mine)} | {naive:.3f} | {ceiling:.3f} | {mean('black_box_test'):.3f} "
            f"| {mean('refined_test'):.3f} | {closed('black_box_test')} | {closed('refined_test')} "
            f"| {paired} | {100 * drop_bb:+.1f} / {100 * drop_rf:+.1f} (held-out fold: "
            f"{folds}) | {cost} "
            f"| {mean('statistics_seconds'):.1f} s, {mean('statistics_trials'):.1f} trials "
            f"| {refs[pool]['envelope']:.3f} "
            f"({100 * (refs[pool]['envelope'] - naive) / (ceiling - naive):.0f}%) |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", type=Path, nargs="+", default=[Path("runs/demo-pool")])
    parser.add_argument("--space", default="task_arithmetic_layers")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--refine", default="{}", help="search.refine as JSON (default: {})")
    parser.add_argument(
        "--objective",
        choices=("nll", "entropy"),
        help="search.refine.objective (overrides --refine's)",
    )
    parser.add_argument("--ceiling", nargs="*", default=[], metavar="POOL=VALUE")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--oracle", action="store_true", help="also refine on test itself (an upper bound)"
    )
    args = parser.parse_args()
    ceilings = {**CEILINGS, **{k: float(v) for k, v in (c.split("=") for c in args.ceiling)}}
    refine = json.loads(args.refine)
    if args.objective:
        refine["objective"] = args.objective
    runs, refs = [], {}
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(args.jobs) as workers:
        pending = {
            workers.submit(references, str(p.resolve()), f"{tmp}/{p.name}"): p.name
            for p in args.pools
        }
        jobs = [
            {
                "pool": str(p.resolve()),
                "space": args.space,
                "seed": seed,
                "trials": args.trials,
                "refine": refine,
                "oracle": args.oracle,
                "workdir": tmp,
            }
            for seed in args.seeds
            for p in args.pools
        ]
        futures = [workers.submit(run_one, job) for job in jobs] + list(pending)
        for done in as_completed(futures):
            if done in pending:
                refs[Path(pending[done]).name] = done.result()
                continue
            run = done.result()
            runs.append(run)
            print(
                f"{run['pool']} seed {run['seed']}: black-box #{run['black_box_trial']} dev "
                f"{run['black_box_dev']:.4f} test {run['black_box_test']:.4f}; refined dev "
                f"{run['refined_dev']:.4f} test {run['refined_test']:.4f}; "
                f"refine {run['refine']['seconds']:.0f} s, {run['refine']['steps']} steps, "
                f"held-out {run['refine']['held_out_start']:.4f} -> "
                f"{run['refine']['held_out_refined']:.4f}",
                flush=True,
            )
            if args.out:
                args.out.write_text(json.dumps({"runs": runs, "references": refs}, indent=2))
    pool_names = {Path(p).name: p for p in args.pools}
    refs = {
        json.loads((Path(pool_names[k]) / "pool.json").read_text())["name"]: v
        for k, v in refs.items()
    }
    for run in runs:
        run["pool"] = json.loads((Path(pool_names[run["pool"]]) / "pool.json").read_text())["name"]
    summarise(runs, refs, ceilings)
    if args.out:
        args.out.write_text(json.dumps({"runs": runs, "references": refs}, indent=2))


if __name__ == "__main__":
    main()
