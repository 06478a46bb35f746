"""Genome-to-score turnaround: in-memory candidates against write-to-disk-and-reload.

    python bench/turnaround.py [--config configs/demo.yaml] [--space NAME] [--repeats 3]
                               [--threads 1] [--params 0.5e9] [--skip-synthetic] [--skip-demo]

Times one trial split into phases, for two ways of turning a genome into a scored model:

  in-memory  `CompiledCandidate.apply(genome)` (the space compiled once per run: the genome's
             values written into the tensor jobs, each merged from resident inputs straight
             into the live model's parameter, its finiteness checked in the same pass), then
             `Evaluator.score` on that same model: what `evomerge search` does.
  on-disk    `run_merge` into a temporary folder, then `AutoModelForCausalLM.from_pretrained` of
             it and a new `Evaluator` (lm-eval tasks + HFLM), then `score`: what mergekit-evolve's
             on-disk mode does (its `simple_evaluate` call rebuilds the tasks every trial too).

on two pools:

  demo       the config's pool (the demo pool by default), real lm-eval scoring of the fitness
             subset (`score(full=False)`, the score every trial gets).
  synthetic  base + 2 fine-tunes of `--params` parameters (random Llama-shaped bf16 tensors,
             written by bench/merge_throughput.py), same space as the config. No scoring here
             (random weights, and lm-eval on a 0.5B model on CPU does not fit the run's few
             minutes), so this pool compares merge + swap against merge + write + reload only.

Each phase is the median over `--repeats` genomes (seeded random draws inside the bounds, the
same genomes for both paths, the two paths interleaved per genome so that load from other
processes hits both alike), after one untimed warm-up genome per path. Both paths must give
the same scores (demo) or the same weights (synthetic): the script checks it.

The reload reads a folder that was just written, so it comes from the page cache: a best case
for the on-disk path. transformers memory-maps a checkpoint whose dtype matches, so some of the
reload is paid at first use; for the synthetic pool the extra cost of a first read of every
weight is printed apart.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Timings:
    """Seconds per phase, one entry per repeat."""

    phases: dict[str, list[float]] = field(default_factory=dict)

    def add(self, **seconds: float) -> None:
        for name, value in seconds.items():
            self.phases.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        values = self.phases.get(name)
        return statistics.median(values) if values else math.nan

    def median_sum(self, *names: str) -> float:
        """Median over repeats of the per-repeat sum (not the sum of medians)."""
        totals = [sum(parts) for parts in zip(*(self.phases[n] for n in names))]
        return statistics.median(totals)


def random_genomes(space, count: int, seed: int) -> list[dict[str, float]]:
    rng = random.Random(seed)
    return [{g.name: rng.uniform(g.low, g.high) for g in space.genes} for _ in range(count)]


def apply_timed(candidate, genome) -> dict[str, float]:
    """`CompiledCandidate.apply` with its steps timed apart: merge (the parameters filled in,
    then the kernel's pass, which also finds whether the result is finite, or the method's
    torch code) and swap (where the result is not in the live parameter yet: the copy there,
    which checks finiteness as it goes).

    The same steps as `apply` (`PreparedTensor.run_into`); the callers also time `apply`
    itself as a cross-check."""
    from evomerge.errors import CandidateError
    from evomerge.kernel.cpu import copy_finite

    merge = swap = 0.0
    for job in candidate.jobs:
        started = time.perf_counter()
        merged, finite = job.tensor.run(job.parameters(genome), out=job.target)
        copying = time.perf_counter()
        if merged is not job.target:
            finite = copy_finite(merged, job.target)
        merge += copying - started
        swap += time.perf_counter() - copying
        if not finite:
            raise CandidateError(f"the merged tensor {job.name!r} has NaN or Inf values")
    return {"merge": merge, "swap": swap}


def read_all(tensors) -> float:
    """Seconds to read every element of `tensors` once."""
    started = time.perf_counter()
    for t in tensors:
        t.detach().amax()
    return time.perf_counter() - started


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


# --- demo pool: real scoring ---------------------------------------------------------------
def bench_demo(config, repeats: int, root: Path) -> tuple[Timings, Timings, dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.fitness import Evaluator
    from evomerge.io.dtypes import torch_dtype
    from evomerge.merging.executor import run_merge
    from evomerge.search.loop import Search

    if not Path(config.pool.base).is_dir():
        raise SystemExit(
            f"the pool base {config.pool.base} does not exist; build the demo pool first: "
            "evomerge pool demo runs/demo-pool"
        )
    (root / "run").mkdir(parents=True)  # Search expects its run folder (the CLI makes it)
    search, setup = timed(Search, config, root / "run")
    dtype = torch_dtype(config.pool.dtype) or torch.float32
    seed = config.search.merge_seed
    genomes = random_genomes(search.space, repeats + 1, seed=0)

    def in_memory(genome) -> tuple[float, dict]:
        phases = apply_timed(search.candidate, genome)
        _, apply = timed(search.candidate.apply, genome)
        result, score = timed(search.evaluator.score, full=False)
        return result.value, {**phases, "score": score, "apply": apply}

    def on_disk(recipe) -> tuple[float, dict]:
        folder = root / "merged"
        _, merge = timed(run_merge, recipe, folder, seed=seed, force=True)
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
        model.to(config.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        load = time.perf_counter() - started
        evaluator, tasks = timed(Evaluator, model, tokenizer, config.fitness, root / "ondisk-run")
        result, score = timed(evaluator.score, full=False)
        del evaluator, model
        gc.collect()
        shutil.rmtree(folder)
        return result.value, {
            "merge": merge,
            "swap": load + tasks,
            "load": load,
            "tasks": tasks,
            "score": score,
        }

    mem, disk = Timings(), Timings()
    mismatches = []
    for i, genome in enumerate(genomes):
        value_mem, t_mem = in_memory(genome)
        value_disk, t_disk = on_disk(search.space.recipe(genome))
        if value_mem != value_disk:
            mismatches.append((i, value_mem, value_disk))
        if i > 0:  # genome 0 warms both paths up
            mem.add(**t_mem)
            disk.add(**t_disk)
    info = {
        "setup": setup,
        "tensors": len(search.candidate.targets),
        "params": sum(p.numel() for p in search.candidate.targets.values()),
        "genes": len(search.space.genes),
        "examples": sum(search.evaluator.tasks.n_docs.values()),
        "scored": sum(map(len, (search.evaluator.tasks.subset or {}).values())),
        "mismatches": mismatches,
    }
    return mem, disk, info


# --- synthetic pool: merge + swap against merge + write + reload --------------------------
def bench_synthetic(
    space_source, params: float, repeats: int, root: Path
) -> tuple[Timings, Timings, dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from evomerge.merging.executor import run_merge
    from evomerge.spaces.parameters.candidate import CompiledCandidate
    from evomerge.spaces.parameters.space import SearchSpace, load_space

    sys.path.insert(0, str(REPO / "bench"))
    from merge_throughput import llama_shapes, write_models

    model_config, _ = llama_shapes(params)
    folders, write = timed(write_models, root / "models", params)
    space = SearchSpace(
        load_space(space_source),
        base=str(folders["base"]),
        models={"ft0": str(folders["ft0"]), "ft1": str(folders["ft1"])},
        num_layers=model_config["num_hidden_layers"],
        dtype="bfloat16",
    )
    started = time.perf_counter()
    live = AutoModelForCausalLM.from_pretrained(folders["base"], dtype=torch.bfloat16).eval()
    candidate = CompiledCandidate(live, space, seed=0)
    setup = time.perf_counter() - started
    genomes = random_genomes(space, repeats + 1, seed=0)

    mem, disk = Timings(), Timings()
    mismatches = []
    for i, genome in enumerate(genomes):
        phases = apply_timed(candidate, genome)
        _, apply = timed(candidate.apply, genome)
        folder = root / "merged"
        _, merge_write = timed(run_merge, space.recipe(genome), folder, seed=0, force=True)
        reloaded, load = timed(AutoModelForCausalLM.from_pretrained, folder, dtype=torch.bfloat16)
        # transformers keeps a checkpoint whose dtype matches memory-mapped, so part of the
        # reload is paid at first use; time one read of every weight on both models.
        touch_disk = read_all(reloaded.parameters())
        touch_live = read_all(candidate.targets.values())
        # Not timed: both paths must have made the same model.
        theirs = dict(reloaded.named_parameters())
        if any(not torch.equal(p, theirs[name]) for name, p in candidate.targets.items()):
            mismatches.append(i)
        del reloaded, theirs
        gc.collect()
        shutil.rmtree(folder)
        if i > 0:
            mem.add(**phases, apply=apply)
            disk.add(merge=merge_write, swap=load, touch=touch_disk - touch_live)
    info = {
        "write": write,
        "setup": setup,
        "params": sum(p.numel() for p in candidate.targets.values()),
        "layers": model_config["num_hidden_layers"],
        "hidden": model_config["hidden_size"],
        "genes": len(space.genes),
        "mismatches": mismatches,
    }
    return mem, disk, info


# --- report --------------------------------------------------------------------------------
def print_table(rows: list[tuple[str, str, Timings, bool]]) -> None:
    head = f"{'pool':<10} {'path':<10} {'merge':>8} {'swap':>8} {'score':>8} {'trial':>8}"
    print(head)
    print("-" * len(head))
    for pool, path, t, scored in rows:
        phases = ("merge", "swap", "score") if scored else ("merge", "swap")
        score = f"{t.median('score'):>8.3f}" if scored else f"{'-':>8}"
        print(
            f"{pool:<10} {path:<10} {t.median('merge'):>8.3f} {t.median('swap'):>8.3f} "
            f"{score} {t.median_sum(*phases):>8.3f}"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--repeats", type=int, default=3, help="timed genomes per pool")
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenMP threads")
    parser.add_argument(
        "--params", type=float, default=0.5e9, help="synthetic parameters per model"
    )
    parser.add_argument(
        "--space", help="a search space in place of the config's (e.g. dare_ties_layers)"
    )
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument(
        "--workdir", type=Path, help="where the scratch folder goes (default: /tmp)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")

    # Before torch (and the merge kernel's OpenMP) start: one thread setting for the whole run.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' bars (lm-eval sets its own)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # "pretrained is not a str" per HFLM
    import torch

    from evomerge.search.config import load_run_config

    torch.set_num_threads(args.threads)
    config = load_run_config(args.config).model_copy(update={"threads": args.threads})
    if args.space:
        config = config.model_copy(update={"space": args.space})
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="evomerge-turnaround-", dir=args.workdir))
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    rows = []
    try:
        if not args.skip_demo:
            mem, disk, demo = bench_demo(config, args.repeats, root / "demo")
            rows += [("demo", "in-memory", mem, True), ("demo", "on-disk", disk, True)]
        if not args.skip_synthetic:
            smem, sdisk, syn = bench_synthetic(
                config.space, args.params, args.repeats, root / "synthetic"
            )
            rows += [
                ("synthetic", "in-memory", smem, False),
                ("synthetic", "on-disk", sdisk, False),
            ]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"\nturnaround: median of {args.repeats} genomes per cell (after 1 warm-up), "
        f"{args.threads} thread(s), seconds; load average {load_before:.1f} -> "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; run took "
        f"{time.perf_counter() - started:.0f} s"
    )
    print(
        "in-memory: merge = parameters from the genome + merge "
        "(the kernel finds finiteness in its pass), "
        "swap = checked copy into the live model (none where the kernel wrote there)"
    )
    print(
        "on-disk:   merge = run_merge to a folder (read sources, merge, write), "
        "swap = from_pretrained (+ new Evaluator on demo)\n"
    )
    print_table(rows)
    print()
    if not args.skip_demo:
        trial_mem = mem.median_sum("merge", "swap", "score")
        trial_disk = disk.median_sum("merge", "swap", "score")
        share = mem.median_sum("merge", "swap") / trial_mem
        print(
            f"demo: {demo['params'] / 1e6:.2f}M parameters in {demo['tensors']} tensors, "
            f"{demo['genes']} genes, {demo['scored'] or demo['examples']} of "
            f"{demo['examples']} examples scored per trial; search set-up {demo['setup']:.1f} s"
        )
        print(f"  ratio on-disk / in-memory, trial:        {trial_disk / trial_mem:6.2f}x")
        print(
            f"  ratio on-disk / in-memory, merge+swap:   "
            f"{disk.median_sum('merge', 'swap') / mem.median_sum('merge', 'swap'):6.0f}x"
        )
        print(
            f"  merge+swap share of an in-memory trial:  {100 * share:6.2f}%  "
            f"(target < 5%: {'met' if share < 0.05 else 'NOT met'})"
        )
        print(
            f"  on-disk swap = {disk.median('load'):.3f} s model load + "
            f"{disk.median('tasks'):.3f} s new Evaluator (tasks + HFLM)"
        )
        print(
            f"  per-trial non-scoring work in memory, CompiledCandidate.apply(genome) itself "
            f"(no decode, no plan; cross-check of merge+swap): {mem.median('apply'):.4f} s"
        )
        check = (
            "same score on both paths for every genome"
            if not demo["mismatches"]
            else f"SCORES DIFFER: {demo['mismatches']}"
        )
        print(f"  {check}")
    if not args.skip_synthetic:
        mem_ms = smem.median_sum("merge", "swap")
        disk_ms = sdisk.median_sum("merge", "swap")
        print(
            f"synthetic: {syn['params'] / 1e9:.2f}B parameters (bf16, {syn['layers']} layers, "
            f"hidden {syn['hidden']}), base + 2, {syn['genes']} genes; wrote models in "
            f"{syn['write']:.0f} s, live model + CompiledCandidate set-up {syn['setup']:.1f} s; "
            "no scoring"
        )
        print(f"  ratio on-disk / in-memory, merge+swap:   {disk_ms / mem_ms:6.2f}x")
        print(
            "  CompiledCandidate.apply(genome) itself (cross-check of merge+swap): "
            f"{smem.median('apply'):.3f} s"
        )
        print(
            f"  on-disk first read of every weight costs {sdisk.median('touch'):.3f} s more than "
            "on the live model (mapped pages faulted in; not in the table)"
        )
        check = (
            "same weights on both paths for every genome"
            if not syn["mismatches"]
            else f"WEIGHTS DIFFER for genomes {syn['mismatches']}"
        )
        print(f"  {check}")


if __name__ == "__main__":
    main()
