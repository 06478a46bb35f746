"""Multi-fidelity against full-fidelity search: examples scored, and the final best on dev.

    python bench/fidelity.py --pools runs/demo-pool runs/demo2-pool --sampler gp \\
        --space task_arithmetic_layers --trials 40 --seeds 0 1 2 --first 16 --eta 3

For each pool and seed, two fresh studies with the same sampler, space, seed and trial budget:
`full` scores every trial on all of dev (`search.fidelity: null`); `multi` scores the first rung
on `--first` examples per task (a random `fitness.subset`, seeded by the search seed) and grows
by `--eta` per rung (`evomerge.search.fidelity`). Printed per run: the examples scored by the whole
search (every trial's `examples`, baselines included), the best trial's dev value (always a
full-fidelity trial, as `evomerge export` takes it) and its standard error (bootstrap over the
dev examples, task by task, from the per-example scores the run folder keeps); per pool: the
ratio of examples scored, full / multi, and the mean best of each. Runs one search at a time
(1 thread). `--out` writes every run as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from search_quality import pool_config


def mode_config(
    pool: Path,
    mode: str,
    *,
    space: str,
    sampler: str,
    seed: int,
    trials: int,
    first: int,
    eta: float,
) -> dict:
    data = pool_config(pool, space, sampler, seed, trials)
    if mode == "multi":
        data["fitness"]["subset"] = {"count": first, "sampling": "random", "seed": seed}
        data["search"]["fidelity"] = {"eta": eta}
    return data


def best_with_error(search, best) -> tuple[float, float]:
    """The best trial's combined dev value and its bootstrap standard error: each task's error
    from its per-example scores, combined with the fitness weights (tasks are independent)."""
    from evomerge.fitness.uncertainty import standard_error
    from evomerge.search.fidelity import read_examples

    evaluator = search.evaluator
    kept = read_examples(search.run_dir, best.number)
    total = sum(s.weight for s in evaluator.tasks.specs)
    variance = 0.0
    for spec in evaluator.tasks.specs:
        values = kept[spec.name]["values"]
        se = standard_error(values, lambda v, name=spec.name: evaluator.aggregate(name, v))
        variance += (spec.weight / total * se) ** 2
    return best.user_attrs["fitness"], math.sqrt(variance)


def run(pool: Path, mode: str, seed: int, args, workdir: Path) -> dict:
    from evomerge.search.config import RunConfig
    from evomerge.search.loop import Search
    from evomerge.search.run_folder import write_run_folder
    from evomerge.search.study import best_trial

    data = mode_config(
        pool,
        mode,
        space=args.space,
        sampler=args.sampler,
        seed=seed,
        trials=args.trials,
        first=args.first,
        eta=args.eta,
    )
    config = RunConfig.model_validate(data)
    run_dir = workdir / f"{pool.name}-{mode}-{seed}"
    write_run_folder(config, run_dir)
    started = time.perf_counter()
    search = Search(config, run_dir)
    search.run(until=args.trials, progress=False)
    seconds = time.perf_counter() - started
    trials = search.study.get_trials(deepcopy=False)
    best = best_trial(search.study, trials)
    value, se = best_with_error(search, best)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    return {
        "pool": pool.name,
        "mode": mode,
        "seed": seed,
        "examples": sum(t.user_attrs.get("examples", 0) for t in trials),
        "full_trials": sum(t.user_attrs.get("fidelity") == "full" for t in complete),
        "complete": len(complete),
        "best_trial": best.number,
        "best_is_baseline": best.user_attrs.get("baseline"),
        "best_dev": value,
        "best_dev_se": se,
        "seconds": seconds,
        "eval_seconds": sum(t.user_attrs.get("eval_seconds", 0.0) for t in complete),
    }


def print_pool(rows: list[dict]) -> None:
    by_mode = {m: [r for r in rows if r["mode"] == m] for m in ("full", "multi")}
    for r in rows:
        print(
            f"  {r['mode']:5s} seed {r['seed']}: {r['examples']:6d} examples, "
            f"{r['full_trials']:2d} of {r['complete']} trials full, "
            f"best #{r['best_trial']} dev {r['best_dev']:.4f} +- {r['best_dev_se']:.4f}, "
            f"eval {r['eval_seconds']:.0f} s, search {r['seconds']:.0f} s"
        )
    full, multi = by_mode["full"], by_mode["multi"]
    if full and multi:
        ratio = statistics.mean(r["examples"] for r in full) / statistics.mean(
            r["examples"] for r in multi
        )

        def mean(rows: list[dict], key: str) -> float:
            return statistics.mean(r[key] for r in rows)

        gap = mean(multi, "best_dev") - mean(full, "best_dev")
        se = mean(full, "best_dev_se")
        eval_ratio = mean(full, "eval_seconds") / mean(multi, "eval_seconds")
        print(
            f"  examples scored, full / multi: {ratio:.2f}x; mean best dev: "
            f"full {mean(full, 'best_dev'):.4f}, multi {mean(multi, 'best_dev'):.4f} "
            f"(multi - full {gap:+.4f}, one standard error {se:.4f}); "
            f"eval seconds full / multi: {eval_ratio:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pools", type=Path, nargs="+", default=[Path("runs/demo-pool"), Path("runs/demo2-pool")]
    )
    parser.add_argument("--space", default="task_arithmetic_layers")
    parser.add_argument("--sampler", default="gp")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--first", type=int, default=16, help="examples per task of the first rung")
    parser.add_argument("--eta", type=float, default=3.0)
    parser.add_argument("--out", type=Path, help="write every run as JSON")
    args = parser.parse_args()

    from evomerge.cli.process import set_up_process

    set_up_process(threads=1, offline=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pool in args.pools:
            print(
                f"{pool.name}: {args.sampler}, {args.space}, {args.trials} trials, first rung "
                f"{args.first}, eta {args.eta:g}",
                flush=True,
            )
            pool_rows = []
            for seed in args.seeds:
                for mode in ("full", "multi"):
                    pool_rows.append(run(pool, mode, seed, args, Path(tmp)))
                    print(json.dumps(pool_rows[-1]), file=sys.stderr, flush=True)
            print_pool(pool_rows)
            rows += pool_rows
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
