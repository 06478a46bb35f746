"""Per-trial overhead of the evaluator, apart from the model's own forward passes.

    python bench/evaluator_overhead.py [POOL_DIR] [--repeats 7]
    .venv-vllm/bin/python bench/evaluator_overhead.py [POOL_DIR] --backend vllm [--repeats 5]

Builds the small demo pool if no POOL_DIR is given, then times, on every example of the
pool's dev tasks, base model, one thread:
  forward — the prepared batches' forward passes alone (generate-until: the greedy
            generation calls), exactly the model work a trial's scoring runs
  score   — one `Evaluator.score(full=True)`: those forward passes, then lm-eval's filters,
            `process_results` and aggregation (requests built once, `fitness.prepared`)
  evaluate — the same scoring through one `lm_eval.evaluator.evaluate` call (the path before
            the requests were prepared once), on the same live model and tasks
  swap    — copying a full set of weights into the live model in place
and, apart, lm-eval's filters + process_results alone, and `score_examples` on 10 examples per
task (a multi-fidelity rung) against their own forward passes.
Times are this process's CPU seconds (one thread, so the work itself; a shared machine's load
stretches wall time, not these), repeats interleaved (forward, score, evaluate, forward, ...);
each is printed as a median, with the ratios between them; overheads are medians of paired
differences (each call minus the forward run just before it).
The target: score - forward <= 10% of forward.

With `--backend vllm` (one in-process vLLM engine, CPU build): per trial of a search, a
random genome of the demo space applied to the staging model, pushed into the engine
(`sync_weights`), then scored on every example two ways, interleaved on the same weights:
`Evaluator.score(full=True)` (requests built once) and one `lm_eval.evaluator.evaluate` call
over the same live LM (the vllm backend's path before); both must give the same metrics.
Printed as medians of CPU and wall seconds.
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
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pool", nargs="?", type=Path, help="a demo pool (default: build small)")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf")
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
    if args.backend == "vllm":
        return bench_vllm(manifest, args.repeats, tmp)
    model = AutoModelForCausalLM.from_pretrained(manifest["models"]["base"]).eval()
    tok = AutoTokenizer.from_pretrained(manifest["models"]["base"])
    first_skill = next(iter(manifest["skills"]))
    donor = AutoModelForCausalLM.from_pretrained(manifest["models"][first_skill])

    config = FitnessConfig(
        tasks=manifest["tasks"], task_paths=[manifest["task_path"]], batch_size=args.batch_size
    )
    t0 = time.process_time()
    evaluator = Evaluator(model, tok, config, tmp / "run")
    setup = time.process_time() - t0
    every = {name: list(range(n)) for name, n in evaluator.tasks.n_docs.items()}

    def forward() -> None:
        evaluator.prepared.forward_only(every)

    def score() -> None:
        evaluator.score(full=True)

    def old() -> None:
        evaluate(
            lm=evaluator.lm,
            task_dict=evaluator.tasks.task_dict,
            cache_requests=False,
            bootstrap_iters=0,
            verbosity="ERROR",
        )

    def metrics() -> None:  # lm-eval's own filters and process_results, on the last responses
        for task, docs in every.items():
            evaluator.prepared.metric_values(task, docs)

    slices = {
        task: list(range(0, n, max(1, n // 10)))[:10] for task, n in evaluator.tasks.n_docs.items()
    }

    def few() -> None:  # a multi-fidelity rung: 10 examples per task
        evaluator.score_examples(slices)

    def few_forward() -> None:
        evaluator.prepared.forward_only(slices)

    def swap() -> None:
        with torch.no_grad():
            for p, q in zip(model.parameters(), donor.parameters()):
                p.data.copy_(q.data)

    timed = {
        "forward": forward,
        "score": score,
        "evaluate": old,
        "metrics": metrics,
        "few": few,
        "few_forward": few_forward,
    }
    for fn in timed.values():  # warm-up: first calls build lazy state
        fn()
    times: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(args.repeats):
        for name, fn in timed.items():
            times[name].append(_timed(fn))
    t_swap = statistics.median(_timed(swap) for _ in range(args.repeats))
    med = {name: statistics.median(ts) for name, ts in times.items()}

    n = sum(len(d) for d in every.values())
    kinds = sorted({t.OUTPUT_TYPE for t in evaluator.tasks.leaf_tasks.values()})
    print(
        f"pool {pool_dir}  ({manifest['size']}, {', '.join(kinds)}), {n} examples, "
        f"batch {args.batch_size}, 1 thread, CPU s, median of {args.repeats} interleaved"
    )
    print(f"  evaluator setup (once)         {setup:8.3f} s")
    print(
        f"  forward passes                 {med['forward']:8.3f} s   "
        f"{1e3 * med['forward'] / n:6.3f} ms/example"
    )
    print(
        f"  score (prepared requests)      {med['score']:8.3f} s   "
        f"{1e3 * med['score'] / n:6.3f} ms/example"
    )
    print(
        f"  lm-eval evaluate (before)      {med['evaluate']:8.3f} s   "
        f"{1e3 * med['evaluate'] / n:6.3f} ms/example"
    )
    print(f"  weight swap in place           {t_swap:8.4f} s")
    # paired (each score minus the forward run just before it): steadier than medians' difference
    overhead = statistics.median(s - f for s, f in zip(times["score"], times["forward"]))
    print(
        f"  overhead = score - forward:    {overhead:.4f} s per trial "
        f"= {100 * overhead / med['forward']:.1f}% of forward (target <= 10%)"
    )
    before = statistics.median(e - f for e, f in zip(times["evaluate"], times["forward"]))
    print(
        f"  before: evaluate - forward:    {before:.4f} s = "
        f"{100 * before / med['forward']:.0f}% of forward"
    )
    print(f"  ratio evaluate / score:        {med['evaluate'] / med['score']:.2f}x")
    print(f"  of the overhead, lm-eval's filters + process_results: {med['metrics']:.4f} s")
    n_few = sum(len(d) for d in slices.values())
    print(
        f"  score_examples, {n_few} examples: {med['few']:.4f} s, their forward passes "
        f"{med['few_forward']:.4f} s "
        f"({100 * (med['few'] - med['few_forward']) / med['few_forward']:.0f}% overhead)"
    )


def bench_vllm(manifest: dict, repeats: int, tmp: Path) -> None:
    """Per trial on a live vLLM engine: apply + push + score, requests built once vs `evaluate`."""
    import random

    from lm_eval.evaluator import evaluate

    from evomerge.fitness.tasks import build_task_set
    from evomerge.search.config import RunConfig
    from evomerge.search.loop import Search

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    skills = list(manifest["skills"])
    config = RunConfig.model_validate(
        {
            "pool": {
                "base": manifest["models"]["base"],
                "models": {s: manifest["models"][s] for s in skills},
                "dtype": "float32",
            },
            "space": "task_arithmetic_layers",
            "fitness": {
                "task_paths": [manifest["task_path"]],
                "tasks": manifest["tasks"],
                "backend": "vllm",
            },
            "search": {"sampler": "random", "trials": 1, "seed": 0},
            "threads": 1,
        }
    )
    (tmp / "run").mkdir(parents=True)
    wall = time.perf_counter()
    search = Search(config, tmp / "run")
    setup = time.perf_counter() - wall
    evaluator, lm = search.evaluator, search.evaluator.lm
    # the old path's own tasks: `evaluate` rebuilds the instances of the tasks it is given
    old_tasks = build_task_set(config.fitness, tmp / "old").task_dict
    every = {name: list(range(n)) for name, n in evaluator.tasks.n_docs.items()}

    def old():
        return evaluate(
            lm=lm,
            task_dict=old_tasks,
            samples=every,
            cache_requests=False,
            bootstrap_iters=0,
            log_samples=True,
            verbosity="ERROR",
        )["results"]

    rng = random.Random(0)
    genomes = [
        {g.name: rng.uniform(g.low, g.high) for g in search.space.genes} for _ in range(repeats + 1)
    ]
    cpu: dict[str, list[float]] = {k: [] for k in ("apply", "push", "score", "evaluate")}
    wall_s: dict[str, list[float]] = {k: [] for k in cpu}
    mismatches = 0
    for i, genome in enumerate(genomes):  # genome 0 warms both paths up
        got = {}
        for name, fn in (
            ("apply", lambda genome=genome: search.candidate.apply(genome)),
            ("push", evaluator.sync_weights),
            ("score", lambda: evaluator.score(full=True)),
            ("evaluate", old),
        ):
            c, w = time.process_time(), time.perf_counter()
            got[name] = fn()
            if i:
                cpu[name].append(time.process_time() - c)
                wall_s[name].append(time.perf_counter() - w)
        reference = {
            t: {k: float(v) for k, v in row.items() if k in got["score"].metrics[t]}
            for t, row in got["evaluate"].items()
        }
        mismatches += reference != got["score"].metrics
    med = {k: statistics.median(v) for k, v in cpu.items()}
    medw = {k: statistics.median(v) for k, v in wall_s.items()}
    n = sum(len(d) for d in every.values())
    print(
        f"pool {manifest['name']} ({manifest['size']}), {n} examples, "
        f"vLLM {_vllm_version()} in-process, 1 thread, median of {repeats} genomes; CPU s (wall s)"
    )
    print(f"  engine + search setup (once)      {setup:8.1f} s wall")
    for name, label in (
        ("apply", "candidate apply"),
        ("push", "sync_weights (push, cache reset)"),
        ("score", "score(full=True), built once"),
        ("evaluate", "lm-eval evaluate (before)"),
    ):
        print(f"  {label:33s} {med[name]:8.3f} s ({medw[name]:.3f})")
    new = med["apply"] + med["push"] + med["score"]
    before = med["apply"] + med["push"] + med["evaluate"]
    new_w = medw["apply"] + medw["push"] + medw["score"]
    before_w = medw["apply"] + medw["push"] + medw["evaluate"]
    print(
        f"  per trial, apply + push + score:  {new:.3f} s ({new_w:.3f}); before {before:.3f} s "
        f"({before_w:.3f})"
    )
    print(
        f"  ratio evaluate / score:           {med['evaluate'] / med['score']:.2f}x; per trial "
        f"{before / new:.2f}x"
    )
    print(
        f"  metrics equal on both paths:      {repeats + 1 - mismatches} of {repeats + 1} genomes"
    )


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


if __name__ == "__main__":
    sys.exit(main())
