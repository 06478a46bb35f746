"""Memory a search holds, in model-sizes: the slope of peak RSS against the bytes of one model.

    python bench/search_memory.py [--hidden 1024] [--layers 4 12] [--sources 3]

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
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
SPACES = ("task_arithmetic_layers", "ties_layers", "dare_ties_layers")


def build_pool(folder: Path, *, hidden: int, layers: int, sources: int) -> dict[str, str]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
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


def child(pool: Path, space_name: str, keep_sources: bool) -> None:
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
    candidate = CompiledCandidate(live, space, seed=0)
    for genome in list(space.baselines().values())[:2]:
        candidate.apply(genome)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    kib = {key: int(status[key].split()[0]) * 1024 for key in ("RssAnon", "VmHWM")}
    model_bytes = sum(p.numel() * 2 for p in live.parameters())
    print(json.dumps({"model_bytes": model_bytes, "held": kib["RssAnon"], "peak": kib["VmHWM"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, nargs=2, default=(4, 12))
    parser.add_argument("--sources", type=int, default=3)
    parser.add_argument("--keep-sources", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("POOL", "SPACE"))
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], args.keep_sources)
        return
    with tempfile.TemporaryDirectory() as scratch:
        pools = {}
        for layers in args.layers:
            pools[layers] = Path(scratch) / f"L{layers}"
            build_pool(pools[layers], hidden=args.hidden, layers=layers, sources=args.sources)
        print(f"hidden {args.hidden}, {args.sources} sources + base, bfloat16")
        for space in SPACES:
            for keep in (True, False) if args.keep_sources else (False,):
                small = _child(pools[args.layers[0]], space, keep)
                large = _child(pools[args.layers[1]], space, keep)
                size = large["model_bytes"] - small["model_bytes"]
                held, peak = ((large[k] - small[k]) / size for k in ("held", "peak"))
                label = "sources + task vectors" if keep else "task vectors only"
                print(f"{space:24s} {label:24s} held {held:5.2f}  peak {peak:5.2f} model-sizes")


def _child(pool: Path, space: str, keep: bool) -> dict[str, int]:
    args = [sys.executable, __file__, "--child", str(pool), space]
    out = subprocess.run(
        args + (["--keep-sources"] if keep else []),
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
