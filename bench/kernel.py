"""Merge-kernel throughput: one per-layer dare_ties (or ties) candidate over base + 3 sources.

    python bench/kernel.py [--params 1e8] [--dtype float32|bfloat16|float16]
                           [--method dare_ties|ties] [--threads 2] [--device cpu|cuda]

Builds synthetic resident inputs the way the search holds them (task vectors, the live
model's parameter each result goes into, per-model density and weight for every tensor), then
times materialising candidates with the fused kernel and with plain torch ops, and the
machine's memory bandwidth (a large tensor copy, timed just before each candidate) in the
same run. Prints bytes moved per second as a fraction of that bandwidth two ways: best
candidate against best copy, and the median over runs of each candidate against the copy
just before it (on a shared machine a lone fast copy, caught while the neighbours were idle,
moves the first figure; the second compares the two at the same moment).

Bytes counted, per element: dare_ties reads each model's task vector once (its random draws
are hashed in the kernel, and the L1 sums of its rescale come from each task vector's draw
table, built once per run: no pass of their own). ties reads each task vector once; its top-k
starts from the task vector's magnitude table (256 KiB, built once per run, kept on the host)
and scans the task vector for the ties at the cut (on the CPU part of one more pass, on a GPU a
counting kernel's pass; float32 also makes one pass for the cut's low bits), bytes not
counted; no magnitude ranks are kept on either. Both read the base once and write the result
once: the bytes a candidate cannot do without. The one-time precomputation (draw tables,
magnitude tables) is timed on its own. For ties, the top-k cuts of a candidate (every tensor's
and source's `FusedTensor.keep_rule`, the device synchronised) are also timed alone, and the
kernel's share (the fused candidate less the cuts) reported beside them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch


class CopyTimer:
    """A large tensor copy, timed between candidates so that bandwidth and kernel see the same
    machine (it is shared and noisy): GB/s of bytes read + written, best run."""

    def __init__(self, numel: int, device: str):
        self.src = torch.ones(numel, dtype=torch.float32, device=device)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)
        self.best = float("inf")

    def run(self) -> float:
        """One copy: its GB/s."""
        start = time.perf_counter()
        self.dst.copy_(self.src)
        sync(self.src.device)
        seconds = time.perf_counter() - start
        self.best = min(self.best, seconds)
        return self.bytes / seconds / 1e9

    @property
    def bytes(self) -> int:
        return 2 * self.src.numel() * 4

    @property
    def gbps(self) -> float:
        return self.bytes / self.best / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(params: float, dtype: torch.dtype, device: str, method: str, models: int = 3):
    """Resident inputs as the search holds them: one FusedTensor per tensor, with the live
    model's parameter its result goes into."""
    from evomerge.kernel.task_vectors import FusedTensor
    from evomerge.methods.random_fields import UniformField
    from evomerge.methods.registry import MergeInputs

    shape = (4096, 4096)
    count = max(1, round(params / (shape[0] * shape[1])))
    generator = torch.Generator().manual_seed(0)
    jobs = []
    for t in range(count):
        base = torch.randn(shape, generator=generator).to(dtype)
        sources = [
            (base.float() + torch.randn(shape, generator=generator) * 0.01).to(dtype)
            for _ in range(models)
        ]
        base, sources = base.to(device), [s.to(device) for s in sources]
        inputs = MergeInputs(
            sources, base, f"model.layers.{t}.mlp.weight", UniformField(0, f"t{t}")
        )
        for i in range(models):  # what the search computes once, before its first trial
            inputs.delta(i)
        fused = FusedTensor(
            inputs,
            rule=METHODS[method]["rule"],
            consensus=METHODS[method]["consensus"],
            resident=True,
        )
        jobs.append((fused, torch.empty_like(base)))
    return jobs


# each method as its registry entry configures it (task_arithmetic.py)
METHODS = {
    "dare_ties": dict(rule="random", consensus=True, normalize=False, rescale=True),
    "ties": dict(rule="magnitude", consensus=True, normalize=True, rescale=False),
}


def candidate(jobs, method: str, *, rng: torch.Generator, fused: bool, models: int = 3):
    """One candidate: by the fused kernel into each live parameter, or by the torch code."""
    from evomerge.methods.task_arithmetic import task_vector_merge

    options = METHODS[method]
    for tensor, live in jobs:  # per-layer genes: every tensor gets its own weights and densities
        weight = (torch.rand(models, generator=rng) * 0.8 + 0.1).tolist()
        density = (torch.rand(models, generator=rng) * 0.6 + 0.3).tolist()
        parameters = dict(
            weight=weight,
            density=density,
            lambda_=1.0,
            normalize=options["normalize"],
            rescale=options["rescale"],
        )
        if fused:
            tensor.merge(**parameters, out=live)
        else:
            task_vector_merge(
                tensor.inputs, **parameters, rule=options["rule"], consensus=options["consensus"]
            )


def precompute(jobs, method: str, models: int = 3) -> tuple[float, int]:
    """What the search computes once per run for `method`: seconds, bytes kept. (bfloat16
    also finds each input's smallest nonzero magnitude, a float, for its fast path's gate.)"""
    start, kept = time.perf_counter(), 0
    for tensor, _ in jobs:
        for i in range(models):
            if method == "dare_ties":
                table = tensor.draw_l1_table(i)
            else:
                table = tensor.magnitude_table(i)  # 4096 x 4096: above MAGNITUDE_TABLE_MIN
            kept += table.numel() * table.element_size()
        if tensor.inputs.base.dtype == torch.bfloat16 and tensor.inputs.base.device.type == "cpu":
            for i in range(models + 1):
                tensor.min_magnitude(i)
    sync(jobs[0][0].inputs.base.device)
    return time.perf_counter() - start, kept


def selection_time(jobs, repeats: int, models: int = 3) -> float:
    """Best seconds per candidate of TIES's top-k cuts alone: each tensor's keep rules at the
    candidate's densities (on a GPU: the count kernel and its searches, one read-back)."""
    rng = torch.Generator().manual_seed(2)
    device = jobs[0][0].inputs.base.device
    best = float("inf")
    for run in range(repeats + 1):  # the first one warms up (compiles the count kernel)
        start = time.perf_counter()
        for tensor, _ in jobs:
            _, taus = tensor.operands()
            density = (torch.rand(models, generator=rng) * 0.6 + 0.3).tolist()
            tensor.keep_rules(taus, density)
        sync(device)
        best = min(best, time.perf_counter() - start) if run else best
    return best


def timed(
    jobs, method: str, repeats: int, copy: CopyTimer, *, fused: bool
) -> tuple[float, list[tuple[float, float]]]:
    """Best seconds per candidate, and (seconds, copy GB/s just before) for every run."""
    rng = torch.Generator().manual_seed(1)
    candidate(jobs, method, rng=rng, fused=fused)  # warm-up
    runs = []
    for _ in range(repeats):
        copy_gbps = copy.run()
        start = time.perf_counter()
        candidate(jobs, method, rng=rng, fused=fused)
        sync(jobs[0][0].inputs.base.device)
        runs.append((time.perf_counter() - start, copy_gbps))
    copy.run()
    return min(seconds for seconds, _ in runs), runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=1e8, help="parameters per model")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--method", choices=sorted(METHODS), default="dare_ties")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--device", default="cpu", help="cpu, or cuda for the Triton kernel against HBM bandwidth"
    )
    parser.add_argument("--repeats", type=int, default=9, help="timed fused candidates")
    parser.add_argument(
        "--torch-repeats",
        type=int,
        default=2,
        help="timed torch-ops candidates (10-15 s each on a CPU)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    itemsize = torch.tensor([], dtype=dtype).element_size()

    jobs = build(args.params, dtype, args.device, args.method)
    numel = sum(tensor.inputs.base.numel() for tensor, _ in jobs)
    moved = numel * (3 * itemsize + 2 * itemsize)
    copy = CopyTimer(min(numel, 1 << 27), args.device)

    from evomerge.kernel import task_vectors

    base = jobs[0][0].inputs.base
    applies = task_vectors.applies(
        [base]
    )  # the kernel built (or found in the cache) before anything is timed
    prepared, table_bytes = precompute(jobs, args.method)
    fused, fused_runs = (
        timed(jobs, args.method, args.repeats, copy, fused=True) if applies else (float("nan"), [])
    )
    cuts = selection_time(jobs, args.repeats) if applies and args.method == "ties" else None
    plain, _ = timed(jobs, args.method, args.torch_repeats, copy, fused=False)
    copy_gbps = copy.gbps

    print(
        f"{args.method} candidate, base + 3 sources, {numel / 1e6:.0f}M parameters per model, "
        f"{args.dtype}, {args.threads} threads"
    )
    print(f"  memory copy bandwidth:     {copy_gbps:6.1f} GB/s")
    print(
        f"  fused kernel:              {fused:6.3f} s  {moved / fused / 1e9:6.1f} GB/s  = "
        f"{moved / fused / 1e9 / copy_gbps:5.1%} of copy bandwidth"
    )
    if fused_runs:
        paired = statistics.median(moved / seconds / 1e9 / gbps for seconds, gbps in fused_runs)
        copies = sorted(gbps for _, gbps in fused_runs)
        print(
            f"  paired with the copy before each run: median {paired:5.1%} (copies "
            f"{copies[0]:.1f}-{copies[-1]:.1f} GB/s)"
        )
    if cuts is not None:
        kernel = fused - cuts
        print(
            f"  of which top-k cuts:       {cuts:6.3f} s  ({cuts / fused:5.1%} of the candidate; "
            f"{3 * len(jobs)} task vectors)"
        )
        print(
            f"  the kernel and the rest:   {kernel:6.3f} s  {moved / kernel / 1e9:6.1f} GB/s  = "
            f"{moved / kernel / 1e9 / copy_gbps:5.1%} of copy bandwidth"
        )
    print(
        f"  torch ops:                 {plain:6.3f} s  {moved / plain / 1e9:6.1f} GB/s  = "
        f"{moved / plain / 1e9 / copy_gbps:5.1%}"
    )
    print(f"  fused / torch speed-up:    {plain / fused:6.1f}x")
    what = "draw table" if args.method == "dare_ties" else "magnitude table"
    print(f"  precomputed once per run:  {prepared:6.3f} s  ({what}s of the 3 task vectors)")
    print(
        f"  resident per parameter:    {itemsize} + {table_bytes / numel / 3:.3f} bytes per source "
        f"(its task vector + {what})"
    )


if __name__ == "__main__":
    main()
