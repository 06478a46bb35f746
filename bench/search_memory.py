"""Memory a search holds, in model-sizes: the slope of peak RSS against the bytes of one model.

    python bench/search_memory.py [--hidden 1024] [--layers 4 12] [--sources 3] [--sampled]

Builds synthetic bfloat16 Llama pools of real layer width (a base and `--sources` fine-tunes,
random weights: memory does not depend on the values), at two depths. For each space (task
arithmetic, TIES, DARE-TIES per group of 2 layers) a child process compiles the search's
candidate over a live model of the base and materialises two genomes into it, as a trial
does. Read at the end: `held`, its anonymous resident memory (what stays allocated for the
run: file pages of the mapped checkpoints are the kernel's cache, not the search's), and `peak`,
its high-water mark of all resident memory (set-up transients and mapped file pages included).
Each is given as the slope between the two depths divided by the bytes of one model: the
constant cost of the process (Python, torch) cancels. Run with `--keep-sources` to see the
layout before task vectors replaced their models (both were kept). No scoring: the evaluator's
activations do not grow with the pool.

Beside them: `trimmed`, the anonymous memory left once malloc gives its free pages back (live
data without the allocator's slack), and `plan`, what `evomerge plan` predicts from the headers
(evomerge/search/memory_plan.py, its activation allowance left out), in full and less the base,
whose tensors are views of its mapped file on the CPU (so not anonymous). `--sampled` applies
a third genome mid-bounds, as a sampled trial does: densities below 1 make TIES form its
magnitude tables, and ranks for tensors under 65,536 elements (the baselines keep everything,
so without it neither is formed). `--tier host` compiles the host tier instead (its inputs in
host memory, streamed through a staging buffer: on the CPU one memory), planned as the host
tier's items in both memories.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
SPACES = ("task_arithmetic_layers", "ties_layers", "dare_ties_layers")


def build_pool(
    folder: Path, *, hidden: int, layers: int, sources: int, grouped: bool = False
) -> dict[str, str]:
    """A bf16 Llama base and `sources` fine-tunes of it (random weights) under `folder`;
    `grouped`: grouped-query attention with a key/value head per 4 query heads, as Llama-3."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256) if grouped else hidden // 64,
        vocab_size=2048,
        tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    base.save_pretrained(folder / "base")
    names = {}
    for i in range(sources):
        with torch.no_grad():
            for p in base.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        base.save_pretrained(folder / f"ft{i}")
        names[f"ft{i}"] = str(folder / f"ft{i}")
    return names


def child(
    pool: Path, space_name: str, keep_sources: bool, sampled: bool = False, tier: str = "device"
) -> None:
    """Compile the candidate, apply two genomes; print the model's bytes (peak RSS at exit)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    if keep_sources:  # the layout before: each model kept beside its task vector
        from evomerge.methods.registry import MergeInputs

        MergeInputs.keep_task_vectors_only = lambda self: None
    from evomerge.io.checkpoint import Checkpoint
    from evomerge.spaces.parameters.space import SearchSpace, SpaceConfig
    from evomerge.spaces.registry import read_space

    models = {p.name: str(p) for p in sorted(pool.glob("ft*"))}
    data, _ = read_space(space_name)
    space = SearchSpace(
        SpaceConfig.model_validate(data),
        base=str(pool / "base"),
        models=models,
        num_layers=Checkpoint(str(pool / "base")).num_layers,
        dtype="bfloat16",
    )
    from evomerge.spaces.parameters.candidate import CompiledCandidate

    live = LlamaForCausalLM.from_pretrained(pool / "base", dtype=torch.bfloat16)
    candidate = CompiledCandidate(live, space, seed=0, tier=tier)
    genomes = list(space.baselines().values())[:2]
    if sampled:  # a trial's genome: every gene mid-bounds (TIES and DARE densities below 1)
        genomes.append({g.name: (g.low + g.high) / 2 for g in space.genes})
    for genome in genomes:
        candidate.apply(genome)
    kib = _status("RssAnon", "VmHWM")
    # what is left once the allocator gives back its free pages: live data, not malloc's slack
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    kib["trimmed"] = _status("RssAnon")["RssAnon"]
    model_bytes = sum(p.numel() * 2 for p in live.parameters())
    from evomerge.search.memory_plan import host_tier, plan_space

    plan = plan_space(space, base=str(pool / "base"), live_dtype="bfloat16")
    if tier == "host":  # on the CPU the host tier's two memories are one
        plan = host_tier(plan)
        plan.items += plan.host_items
    planned = plan.total - plan.item("activations").bytes  # no scoring here
    print(
        json.dumps(
            {
                "model_bytes": model_bytes,
                "held": kib["RssAnon"],
                "peak": kib["VmHWM"],
                "trimmed": kib["trimmed"],
                "plan": planned,
                # on the CPU the base's tensors are views of its mapped file: not anonymous
                "plan_anon": planned - plan.item("base").bytes,
            }
        )
    )


def _status(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status, in bytes."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(status[key].split()[0]) * 1024 for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, nargs=2, default=(4, 12))
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--spaces", nargs="+", default=SPACES, help="(default: all three)")
    parser.add_argument("--keep-sources", action="store_true")
    parser.add_argument(
        "--sampled",
        action="store_true",
        help="also apply a genome mid-bounds, as a sampled trial is (densities below 1: TIES "
        "forms its magnitude tables, DARE its draw tables)",
    )
    parser.add_argument("--tier", choices=("device", "host"), default="device")
    parser.add_argument("--child", nargs=2, metavar=("POOL", "SPACE"))
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], args.keep_sources, args.sampled, args.tier)
        return
    with tempfile.TemporaryDirectory() as scratch:
        pools = {}
        for layers in args.layers:
            pools[layers] = Path(scratch) / f"L{layers}"
            build_pool(pools[layers], hidden=args.hidden, layers=layers, sources=args.sources)
        print(f"hidden {args.hidden}, {args.sources} sources + base, bfloat16, {args.tier} tier")
        for space in args.spaces:
            for keep in (True, False) if args.keep_sources else (False,):
                small = _child(pools[args.layers[0]], space, keep, args.sampled, args.tier)
                large = _child(pools[args.layers[1]], space, keep, args.sampled, args.tier)
                size = large["model_bytes"] - small["model_bytes"]
                keys = ("held", "trimmed", "peak", "plan", "plan_anon")
                held, trimmed, peak, plan, plan_anon = ((large[k] - small[k]) / size for k in keys)
                label = "sources + task vectors" if keep else "task vectors only"
                print(
                    f"{space:24s} {label:24s} held {held:5.2f} (trimmed {trimmed:5.2f})  "
                    f"peak {peak:5.2f} model-sizes; plan {plan:5.2f} "
                    f"({plan_anon:5.2f} less the mapped base)"
                )


def _child(
    pool: Path, space: str, keep: bool, sampled: bool = False, tier: str = "device"
) -> dict[str, int]:
    args = [sys.executable, __file__, "--child", str(pool), space, "--tier", tier]
    out = subprocess.run(
        args + (["--keep-sources"] if keep else []) + (["--sampled"] if sampled else []),
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
