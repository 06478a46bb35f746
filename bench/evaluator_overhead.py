"""Per-trial overhead of the evaluator, apart from the model's own forward passes.

    python bench/evaluator_overhead.py [POOL_DIR] [--repeats 5]

Builds the small demo pool if no POOL_DIR is given, then times, on the same examples:
  score   — one `Evaluator.score(full=True)` call (lm-eval `evaluate` over prebuilt tasks)
  forward — the bare forward passes those examples need (same batch size, no lm-eval)
  swap    — copying a full set of weights into the live model in place
and prints each as a median and the ratios between them, all from this one run.
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


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pool", nargs="?", type=Path, help="a demo pool (default: build small)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch
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

    # The same examples lm-eval scores: context + continuation of every document.
    texts = []
    for task in evaluator.tasks.leaf_tasks.values():
        for doc in task.eval_docs:
            texts.append(task.doc_to_text(doc) + task.config.target_delimiter
                         + str(task.doc_to_target(doc)))
    batches = []
    for i in range(0, len(texts), args.batch_size):
        enc = tok(texts[i : i + args.batch_size], return_tensors="pt", padding=True)
        batches.append(enc)

    def forward() -> None:
        with torch.no_grad():
            for enc in batches:
                model(**enc).logits.log_softmax(-1)

    def swap() -> None:
        with torch.no_grad():
            for p, q in zip(model.parameters(), donor.parameters()):
                p.data.copy_(q.data)

    evaluator.score(full=True)  # warm-up (first call builds lm-eval's internal state)
    forward()
    t_score = _median_time(lambda: evaluator.score(full=True), args.repeats)
    t_forward = _median_time(forward, args.repeats)
    t_swap = _median_time(swap, args.repeats)

    n = len(texts)
    print(f"pool {pool_dir}  ({manifest['size']}), {n} examples, batch {args.batch_size}, "
          f"1 thread, median of {args.repeats}")
    print(f"  evaluator setup (once)   {setup:8.3f} s")
    print(f"  score (lm-eval evaluate) {t_score:8.3f} s   {1e3 * t_score / n:6.3f} ms/example")
    print(f"  raw forward passes       {t_forward:8.3f} s   {1e3 * t_forward / n:6.3f} ms/example")
    print(f"  weight swap in place     {t_swap:8.4f} s")
    print(f"  overhead = score - forward: {t_score - t_forward:.3f} s per trial")
    print(f"  ratio score / forward:      {t_score / t_forward:.2f}x")
    print(f"  ratio swap / score:         {t_swap / t_score:.4f}")


if __name__ == "__main__":
    sys.exit(main())
