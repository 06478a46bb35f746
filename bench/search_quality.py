"""Search quality on the demo pool: CMA-ES vs TPE vs random, several seeds each.

    python bench/search_quality.py [--pool runs/demo-pool] [--trials 50] [--seeds 0 1 2]

For each sampler and seed, a fresh study (baselines enqueued first, every trial scored on the
full task set) runs `--trials` trials; the script prints the best combined score of each run
next to the baselines (uniform merge, dare_ties density 0.5 weight 0.5, each specialist alone)
and the margins the issue's target asks about: CMA-ES over the best specialist (>= 5 points)
and over the dare_ties 0.5/0.5 recipe.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_one(pool: Path, space: str, sampler: str, seed: int, trials: int, workdir: Path):
    from evomerge.config import RunConfig
    from evomerge.run_folder import write_run_folder
    from evomerge.search import Search

    config = RunConfig.model_validate(
        {
            "pool": {
                "base": str(pool / "base"),
                "models": {m: str(pool / m) for m in ("add", "rev", "sort")},
                "dtype": "float32",
            },
            "space": space,
            "fitness": {"task_paths": [str(pool / "tasks")], "tasks": ["evomerge_add", "evomerge_rev", "evomerge_sort"]},
            "search": {"sampler": sampler, "trials": trials, "seed": seed, "promotion": None},
            "threads": 1,
        }
    )
    run_dir = workdir / f"{Path(space).stem}-{sampler}-{seed}"
    write_run_folder(config, run_dir)
    search = Search(config, run_dir)
    search.run(until=trials, progress=False)
    done = [t for t in search.study.trials if t.state.name == "COMPLETE"]
    baselines = {t.user_attrs["baseline"]: t.value for t in done if "baseline" in t.user_attrs}
    return max(t.value for t in done), baselines


def main() -> None:
    import torch

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=Path, default=Path("runs/demo-pool"))
    parser.add_argument("--space", default="dare_ties_layers")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samplers", nargs="+", default=["cmaes", "tpe", "random"])
    args = parser.parse_args()

    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # The classic recipes, scored once: the baselines of the two-parameters-per-model
        # dare_ties space (uniform, dare_ties 0.5/0.5, each specialist alone).
        _, baselines = run_one(args.pool, "dare_ties_global", "random", 0, 5, Path(tmp) / "reference")
        for sampler in args.samplers:
            for seed in args.seeds:
                started = time.perf_counter()
                best, _ = run_one(args.pool, args.space, sampler, seed, args.trials, Path(tmp))
                results.setdefault(sampler, []).append(best)
                print(f"{sampler:>7} seed {seed}: best {best:.4f}  ({time.perf_counter() - started:.0f} s)", flush=True)

    print(f"\nbest combined score after {args.trials} trials (space {args.space}):")
    for sampler, scores in results.items():
        print(f"  {sampler:>7}: mean {statistics.mean(scores):.4f}  min {min(scores):.4f}  max {max(scores):.4f}")
    print("baselines:")
    for label, value in sorted(baselines.items(), key=lambda kv: -kv[1]):
        print(f"  {label:>14}: {value:.4f}")
    specialists = [v for k, v in baselines.items() if k.startswith("only_")]
    if "cmaes" in results and specialists:
        worst_cma = min(results["cmaes"])
        print(f"\nCMA-ES (worst seed) - best specialist: {100 * (worst_cma - max(specialists)):+.1f} points (target >= +5)")
        if "dare_ties_0.5" in baselines:
            print(f"CMA-ES (worst seed) - dare_ties 0.5/0.5: {100 * (worst_cma - baselines['dare_ties_0.5']):+.1f} points (target > 0)")


if __name__ == "__main__":
    main()
