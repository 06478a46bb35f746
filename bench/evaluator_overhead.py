"""Per-trial overhead of the evaluator, apart from the model's own forward passes.

    python bench/evaluator_overhead.py [POOL_DIR] [--repeats 7]

Builds the small demo pool if no POOL_DIR is given, then times, on every example of the
pool's dev tasks, base model, one thread:
  forward — the prepared batches' forward passes alone (generate-until: the greedy
            generation calls), exactly the model work a trial's scoring runs
  score   — one `Evaluator.score(full=True)`: those forward passes, then lm-eval's filters,
            `process_results` and aggregation (requests built once, `fitness.prepared`)
  evaluate — the same scoring through one `lm_eval.evaluator.evaluate` call (the path before
            the requests were prepared once), on the same live model and tasks
  swap    — copying a full set of weights into the live model in place
Repeats are interleaved (forward, score, evaluate, forward, ...) so that load on a shared
machine falls on all three alike; each is printed as a median, with the ratios between them.
The target: score - forward <= 10% of forward.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pool", nargs="?", type=Path, help="a demo pool (default: build small)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    import torch
    from lm_eval.evaluator import evaluate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.fitness import Evaluator, FitnessConfig
    from evomerge.pool import build_pool, load_manifest

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="evomerge-bench-"))
    pool_dir = args.pool
    if pool_dir is None:
        pool_dir = tmp / "pool"
        build_pool(pool_dir, size="small")
    manifest = load_manifest(pool_dir)
    model = AutoModelForCausalLM.from_pretrained(manifest["models"]["base"]).eval()
    tok = AutoTokenizer.from_pretrained(manifest["models"]["base"])
    first_skill = next(iter(manifest["skills"]))
    donor = AutoModelForCausalLM.from_pretrained(manifest["models"][first_skill])

    config = FitnessConfig(
        tasks=manifest["tasks"], task_paths=[manifest["task_path"]], batch_size=args.batch_size
    )
    t0 = time.perf_counter()
    evaluator = Evaluator(model, tok, config, tmp / "run")
    setup = time.perf_counter() - t0
    every = {name: list(range(n)) for name, n in evaluator.tasks.n_docs.items()}

    def forward() -> None:
        evaluator.prepared.forward_only(every)

    def score() -> None:
        evaluator.score(full=True)

    def old() -> None:
        evaluate(lm=evaluator.lm, task_dict=evaluator.tasks.task_dict, cache_requests=False,
                 bootstrap_iters=0, verbosity="ERROR")

    def swap() -> None:
        with torch.no_grad():
            for p, q in zip(model.parameters(), donor.parameters()):
                p.data.copy_(q.data)

    for fn in (forward, score, old):  # warm-up: first calls build lazy state
        fn()
    times: dict[str, list[float]] = {"forward": [], "score": [], "evaluate": []}
    for _ in range(args.repeats):
        for name, fn in (("forward", forward), ("score", score), ("evaluate", old)):
            times[name].append(_timed(fn))
    t_swap = statistics.median(_timed(swap) for _ in range(args.repeats))
    med = {name: statistics.median(ts) for name, ts in times.items()}

    n = sum(len(d) for d in every.values())
    kinds = sorted({t.OUTPUT_TYPE for t in evaluator.tasks.leaf_tasks.values()})
    print(f"pool {pool_dir}  ({manifest['size']}, {', '.join(kinds)}), {n} examples, "
          f"batch {args.batch_size}, 1 thread, median of {args.repeats} interleaved")
    print(f"  evaluator setup (once)         {setup:8.3f} s")
    print(f"  forward passes                 {med['forward']:8.3f} s   {1e3 * med['forward'] / n:6.3f} ms/example")
    print(f"  score (prepared requests)      {med['score']:8.3f} s   {1e3 * med['score'] / n:6.3f} ms/example")
    print(f"  lm-eval evaluate (before)      {med['evaluate']:8.3f} s   {1e3 * med['evaluate'] / n:6.3f} ms/example")
    print(f"  weight swap in place           {t_swap:8.4f} s")
    overhead = med["score"] - med["forward"]
    print(f"  overhead = score - forward:    {overhead:.4f} s per trial "
          f"= {100 * overhead / med['forward']:.1f}% of forward (target <= 10%)")
    print(f"  before: evaluate - forward:    {med['evaluate'] - med['forward']:.4f} s "
          f"= {100 * (med['evaluate'] - med['forward']) / med['forward']:.0f}% of forward")
    print(f"  ratio evaluate / score:        {med['evaluate'] / med['score']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
