"""The host tier's merge+push per trial against this machine's memory bandwidth, in one run.

    python bench/host_tier.py [--hidden 2048] [--layers 4] [--sources 3] [--repeats 3]
                              [--device cuda]

Builds a synthetic bfloat16 Llama pool of real layer shapes (a base and `--sources` fine-tunes,
hidden 2048, MLP 8192: Llama-3.2-1B's layers; random weights), compiles a search's candidate
over a live model of the base in each tier (evomerge/spaces/parameters/candidate.py) and times
`apply(genome)` (a genome mid-bounds, as a sampled trial; best of `--repeats`), for task
arithmetic, TIES and DARE-TIES. Printed, per space and tier:

  copied   the bytes a trial copies into the staging buffer (the host tier: every streamed
           tensor's base and task vectors; `Staging.moved`)
  traffic  the bytes a trial reads and writes in memory: the copies (read and written) and the
           merge (its operands read, the merged tensor written)
  ratio    the trial's time over traffic / the measured copy bandwidth: 1.0 is a plain copy's
           speed; the target is within 2x

The copy bandwidth is a large torch copy (read + written bytes a second, best of five). On a
CPU both tiers share one memory, so the host tier costs its copies; on a GPU (`--device cuda`)
the copies cross the host link on a side stream beside the merges, and the host tier's ratio is
its time over the copied bytes / the measured pinned host-to-GPU bandwidth. Each space's two
tiers are also compared tensor by tensor: `same bits` (torch.equal on every merged tensor).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_memory import build_pool  # noqa: E402

SPACES = ("task_arithmetic_layers", "ties_layers", "dare_ties_layers")


def copy_bandwidth(device: str = "cpu", size: int = 512 << 20, repeats: int = 5) -> float:
    """Read + written bytes a second of a large torch copy on `device`, best of `repeats`."""
    import torch

    src = torch.ones(size // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def measure(pool: Path, space_name: str, tier: str, repeats: int, device: str = "cpu") -> dict:
    """Seconds of one trial's apply (best of `repeats`), what it moves, and its merged tensors
    (on the CPU)."""
    import torch
    from transformers import LlamaForCausalLM

    from evomerge.io.checkpoint import Checkpoint
    from evomerge.spaces.parameters.candidate import CompiledCandidate
    from evomerge.spaces.parameters.space import SearchSpace, SpaceConfig
    from evomerge.spaces.registry import read_space

    data, _ = read_space(space_name)
    space = SearchSpace(
        SpaceConfig.model_validate(data),
        base=str(pool / "base"),
        models={p.name: str(p) for p in sorted(pool.glob("ft*"))},
        num_layers=Checkpoint(str(pool / "base")).num_layers,
        dtype="bfloat16",
    )
    live = LlamaForCausalLM.from_pretrained(pool / "base", dtype=torch.bfloat16).to(device)
    candidate = CompiledCandidate(live, space, seed=0, device=device, tier=tier)
    genome = {g.name: (g.low + g.high) / 2 for g in space.genes}
    candidate.apply(genome)  # first use: TIES's tables, DARE's draw tables
    best = float("inf")
    staging = candidate.staging
    for _ in range(repeats):
        moved = staging.moved if staging is not None else 0
        _sync(device)
        start = time.perf_counter()
        candidate.apply(genome)
        _sync(device)
        best = min(best, time.perf_counter() - start)
        copied = staging.moved - moved if staging is not None else 0
    operands = sum(
        sum(t.nbytes for t in job.tensor.fused.host_operands())
        for job in candidate.jobs
        if getattr(job.tensor, "fused", None) is not None
    )
    written = sum(t.numel() * t.element_size() for t in candidate.targets.values())
    result = {
        "seconds": best,
        "copied": copied,
        "traffic": 2 * copied + operands + written,
        "staging": staging.nbytes if staging is not None else 0,
        "model": written,
        "merged": {name: t.detach().cpu().clone() for name, t in candidate.targets.items()},
    }
    del candidate, live
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spaces", nargs="+", default=SPACES)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    bandwidth = copy_bandwidth(args.device)
    print(
        f"memory copy bandwidth on {args.device} (a 512 MiB torch copy, read + written): "
        f"{bandwidth / 1e9:.2f} GB/s"
    )
    link = None
    if args.device.startswith("cuda"):
        from evomerge.search.memory_plan import link_bandwidth

        link = link_bandwidth(args.device)
        print(f"host-to-GPU bandwidth (pinned, 256 MiB): {link / 1e9:.2f} GB/s")
    with tempfile.TemporaryDirectory() as scratch:
        pool = Path(scratch) / "pool"
        build_pool(pool, hidden=args.hidden, layers=args.layers, sources=args.sources, grouped=True)
        print(
            f"pool: bfloat16 Llama layers, hidden {args.hidden}, MLP {4 * args.hidden}, "
            f"{args.layers} layers, base + {args.sources} sources, "
            f"{torch.get_num_threads()} thread(s)"
        )
        for space in args.spaces:
            merged = {}
            for tier in ("device", "host"):
                got = measure(pool, space, tier, args.repeats, args.device)
                merged[tier] = got.pop("merged")
                ideal = got["traffic"] / bandwidth
                if link is not None and tier == "host":  # bound by the host link
                    ideal = max(ideal, got["copied"] / link)
                print(
                    f"{space:24s} {tier:6s} {got['seconds'] * 1e3:8.1f} ms a trial; copied "
                    f"{got['copied'] / 1e9:.3f} GB, traffic {got['traffic'] / 1e9:.3f} GB "
                    f"(model {got['model'] / 1e9:.3f} GB, staging buffer "
                    f"{got['staging'] / 1e6:.1f} MB); achieved "
                    f"{got['traffic'] / got['seconds'] / 1e9:.2f} GB/s, time / ideal "
                    f"{got['seconds'] / ideal:.2f}"
                )
                sys.stdout.flush()
            same = all(torch.equal(t, merged["host"][name]) for name, t in merged["device"].items())
            print(f"{space:24s} same bits in both tiers: {same}")


if __name__ == "__main__":
    main()
