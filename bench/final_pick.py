"""How much a smarter final pick could gain: every trial of fresh searches scored on test.

    python bench/final_pick.py --pool runs/demo-pool --spaces dare_ties_layers ties_layers \\
        --samplers gp --seeds 0 1 2 --trials 50 --jobs 2 --out pick.json

`evomerge export` takes the trial with the best dev score. Among 50 trials whose dev scores
differ by less than the dev split's noise, that pick pays a winner's curse: its dev score
overstates its test score. This bench runs the same studies as `bench/search_quality.py`
(baselines queued, every trial on all of dev), scores *every* complete trial on test (the
search never sees these scores), and prints, per run and on average, the test score of the
trial each rule picks:

- `dev-best`  the best dev score (what export does);
- `gp-mean`   the best posterior mean of a Gaussian process fitted to the dev scores (Matern
              5/2, one length scale, its noise fitted): a pick that pools each trial's score
              with its neighbours' (the usual recommendation for noisy Bayesian optimisation);
- `knn-3`     the best mean dev score of a trial and its two nearest neighbours (genes scaled
              to their bounds);
- `test-best` the best test score: no rule can do better with these trials (an upper bound,
              itself flattered by the test split's own noise).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import search_quality  # the same studies and the same pool configs

RULES = ("dev-best", "gp-mean", "knn-3", "test-best")


def run(job: dict) -> dict:
    """One fresh study; every complete trial's genes (scaled to [0, 1]), dev and test score."""
    search_quality._setup()
    from evomerge.results.heldout import HeldOut
    from evomerge.search.config import RunConfig

    data = search_quality.pool_config(
        Path(job["pool"]), job["space"], job["sampler"], job["seed"], job["trials"]
    )
    config = RunConfig.model_validate(data)
    run_dir = Path(job["workdir"]) / f"{job['space']}-{job['sampler']}-{job['seed']}"
    _, done = search_quality.search(config, run_dir, config.search.trials)
    held = HeldOut(config, run_dir)
    trials = []
    for t in done:
        scores = held.score(t.params)
        genes = [
            (t.params[k] - d.low) / (d.high - d.low) for k, d in sorted(t.distributions.items())
        ]
        trials.append(
            {
                "number": t.number,
                "genes": genes,
                "dev": t.user_attrs["fitness"],
                "test": scores["test"].value,
            }
        )
    return {k: job[k] for k in ("space", "sampler", "seed")} | {"trials": trials}


def picks(trials: list[dict]) -> dict[str, int]:
    """Rule -> index of the trial it picks."""
    import numpy as np

    genes = np.array([t["genes"] for t in trials])
    dev = np.array([t["dev"] for t in trials])
    distance = ((genes[:, None, :] - genes[None, :, :]) ** 2).sum(-1)
    knn = dev[np.argsort(distance, axis=1)[:, :3]].mean(1)
    return {
        "dev-best": int(dev.argmax()),
        "gp-mean": int(gp_posterior_mean(genes, dev).argmax()),
        "knn-3": int(knn.argmax()),
        "test-best": int(np.argmax([t["test"] for t in trials])),
    }


def gp_posterior_mean(x, y):
    """A GP's posterior mean at its own training points (Matern 5/2, one length scale, signal
    and noise variance fitted by maximum marginal likelihood)."""
    import torch

    x = torch.tensor(x, dtype=torch.float64)
    z = torch.tensor((y - y.mean()) / (y.std() + 1e-12), dtype=torch.float64)
    log_scale, log_signal, log_noise = (
        torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.0, 0.0, math.log(0.1))
    )
    eye = torch.eye(len(z), dtype=torch.float64)

    def kernel():
        r = math.sqrt(5) * torch.sqrt(torch.cdist(x, x) ** 2 / torch.exp(2 * log_scale) + 1e-12)
        return torch.exp(log_signal) * (1 + r + r * r / 3) * torch.exp(-r)

    def negative_log_likelihood():
        chol = torch.linalg.cholesky(kernel() + (torch.exp(log_noise) + 1e-6) * eye)
        alpha = torch.cholesky_solve(z[:, None], chol)
        return 0.5 * (z[:, None] * alpha).sum() + torch.log(torch.diagonal(chol)).sum()

    optimizer = torch.optim.LBFGS(
        [log_scale, log_signal, log_noise], max_iter=200, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = negative_log_likelihood()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        k = kernel()
        return (k @ torch.linalg.solve(k + (torch.exp(log_noise) + 1e-6) * eye, z)).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=Path, default=Path("runs/demo-pool"))
    parser.add_argument("--spaces", nargs="+", default=["dare_ties_layers", "ties_layers"])
    parser.add_argument("--samplers", nargs="+", default=["gp"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write every run's trials as JSON")
    args = parser.parse_args()
    pool = args.pool.resolve()
    if not (pool / "pool.json").is_file():
        parser.error(f"{pool} has no pool.json")

    runs = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        ProcessPoolExecutor(max_workers=args.jobs) as workers,
    ):
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
        for done in as_completed([workers.submit(run, job) for job in jobs]):
            result = done.result()
            chosen = picks(result["trials"])
            result["picks"] = {rule: result["trials"][i]["test"] for rule, i in chosen.items()}
            runs.append(result)
            print(
                f"{result['sampler']:>10} {result['space']:<24} seed {result['seed']}: "
                + "  ".join(f"{rule} {v:.4f}" for rule, v in result["picks"].items()),
                flush=True,
            )
            if args.out:
                args.out.write_text(json.dumps({"pool": str(pool), "runs": runs}))
    print(
        f"\nmean test score of the picked trial over {len(runs)} runs ({args.trials} trials each):"
    )
    for rule in RULES:
        mean = statistics.mean(r["picks"][rule] for r in runs)
        gain = 100 * statistics.mean(r["picks"][rule] - r["picks"]["dev-best"] for r in runs)
        print(f"  {rule:<10} {mean:.4f}  ({gain:+.2f} points over dev-best)")


if __name__ == "__main__":
    main()
