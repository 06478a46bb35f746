"""Merge throughput: evomerge against mergekit 0.1.5 on synthetic ~0.5B-parameter bf16 models.

    python bench/merge_throughput.py [--params 0.5e9] [--repeats 1] [--skip-mergekit] [--profile]
                                     [--lora-rank 16] [--search-memory]

Builds a base and two fine-tunes (random Llama-shaped tensors written straight to safetensors
shards: no model is instantiated), merges the same `ties` and `dare_ties` recipes with
`evomerge merge` (in-process `run_merge`) and with mergekit (one process, its Python API, in the
environment of tests/helpers/mergekit_env.py), and prints for each:

  - wall seconds for both, and the ratio mergekit / evomerge in-process; then the same ratio
    for the command lines: a fresh process per merge on both sides (a timed `evomerge merge`,
    and mergekit's start-up, imports and one merge, which is what `mergekit-yaml` does);
  - evomerge's throughput in GB/s of bytes read + written, next to this machine's memory-copy
    bandwidth measured in the same run (torch copy of a 1 GiB buffer, also read + written).

Both sides use every core (torch's default); set OMP_NUM_THREADS to change that. Every timed
merge, of either tool, starts after an untimed os.sync() and its output is deleted once timed,
so none competes with the write-back of another's gigabyte; --repeats N keeps the best of N
runs, for both tools alike.

The `lora` row merges two PEFT LoRA adapters of the base (rank --lora-rank on every linear layer,
`model: base+adapter`) by task arithmetic, and adds the peak resident memory of each tool's
process: evomerge applies an adapter per tensor as it reads it, mergekit first merges each
adapter into a full model (PEFT's merge_and_unload) and saves it to a cache folder.

`--search-memory` measures a search's set-up instead of merges: for each space, a fresh process
compiles the candidates (`CompiledCandidate`) of a pool of the two full fine-tunes and of a pool
of the two adapters, over a live bf16 model, applies 3 genomes, and prints the bytes its
compiled jobs keep between trials (tensors counted once), its peak resident memory (VmHWM,
live model and imports included) and the median seconds of one `apply`.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
GB = 1e9

RECIPES = {
    "ties": """
merge_method: ties
base_model: {base}
dtype: bfloat16
parameters: {{normalize: true}}
models:
  - model: {ft0}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.5}}
""",
    "dare_ties": """
merge_method: dare_ties
base_model: {base}
dtype: bfloat16
models:
  - model: {ft0}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.5}}
""",
    "lora": """
merge_method: task_arithmetic
base_model: {base}
dtype: bfloat16
models:
  - model: {base}+{lora0}
    parameters: {{weight: 0.5}}
  - model: {base}+{lora1}
    parameters: {{weight: 0.5}}
""",
}


# --- synthetic models ----------------------------------------------------------------------
def llama_shapes(params: float) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """A Llama config (GQA, untied head) of about `params` parameters and its tensor shapes."""
    hidden = int(min(2048, max(128, 64 * round(math.sqrt(params / 450) / 64))))
    heads = max(2, hidden // 64)
    kv_heads = max(1, heads // 4)
    inter = 64 * round(2.75 * hidden / 64)
    vocab = 32 * hidden
    head_dim = hidden // heads
    per_layer = (
        2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter + 2 * hidden
    )
    layers = max(2, round((params - 2 * vocab * hidden - hidden) / per_layer))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
        "rope_theta": 10000.0,
    }
    kv = kv_heads * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (kv, hidden),
                p + "self_attn.v_proj.weight": (kv, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
            }
        )
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return config, shapes


def write_models(root: Path, params: float, shard_bytes: int = 1 << 30) -> dict[str, Path]:
    """base, ft0, ft1 as sharded bf16 safetensors folders; fine-tunes = base + small noise."""
    config, shapes = llama_shapes(params)
    folders = {name: root / name for name in ("base", "ft0", "ft1")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    writers = {name: _ShardWriter(folder, shard_bytes) for name, folder in folders.items()}
    g = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            base = torch.ones(shape, dtype=torch.bfloat16)
        else:
            base = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        writers["base"].add(name, base)
        for ft in ("ft0", "ft1"):
            noise = torch.randn(shape, generator=g).mul_(0.002)
            writers[ft].add(name, (base.float() + noise).to(torch.bfloat16))
    for writer in writers.values():
        writer.finish()
    return folders


def write_adapters(root: Path, base: Path, rank: int) -> dict[str, Path]:
    """lora0, lora1: PEFT LoRA adapters of `base` on every linear layer of the decoder."""
    from safetensors import safe_open

    folders = {}
    g = torch.Generator().manual_seed(1)
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    for name in ("lora0", "lora1"):
        folder = folders[name] = root / name
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for tensor, file in index.items():
            if ".layers." not in tensor or "proj" not in tensor:
                continue
            with safe_open(str(base / file), framework="pt") as handle:
                out_dim, in_dim = handle.get_slice(tensor).get_shape()
            module = tensor.removesuffix(".weight")
            tensors[f"base_model.model.{module}.lora_A.weight"] = (
                torch.randn(rank, in_dim, generator=g) * 0.01
            ).to(torch.bfloat16)
            tensors[f"base_model.model.{module}.lora_B.weight"] = (
                torch.randn(out_dim, rank, generator=g) * 0.01
            ).to(torch.bfloat16)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "task_type": "CAUSAL_LM",
                    "r": rank,
                    "lora_alpha": 2 * rank,
                    "lora_dropout": 0.0,
                    "bias": "none",
                    "base_model_name_or_path": str(base),
                    "target_modules": [
                        "q_proj",
                        "k_proj",
                        "v_proj",
                        "o_proj",
                        "gate_proj",
                        "up_proj",
                        "down_proj",
                    ],
                }
            )
        )
    return folders


class _ShardWriter:
    def __init__(self, folder: Path, shard_bytes: int):
        self.folder, self.shard_bytes = folder, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes, self.index, self.files = 0, {}, []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size

    def _flush(self) -> None:
        file = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / file), metadata={"format": "pt"})
        self.index.update({name: file for name in self.pending})
        self.files.append(file)
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending:
            self._flush()
        total = sum((self.folder / f).stat().st_size for f in self.files)
        index = {"metadata": {"total_size": total}, "weight_map": self.index}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


# --- measurements --------------------------------------------------------------------------
def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes read + written per second by torch's copy of an `nbytes` buffer (best of runs)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return 2 * nbytes / best


def settled() -> None:
    """Flush dirty pages before a timed merge (not timed): each merge then starts from the same
    state instead of competing with the write-back of the previous merge's output."""
    os.sync()


def run_evomerge(
    folders: dict[str, Path], out_root: Path, profile: bool, repeats: int
) -> dict[str, dict]:
    """Best of `repeats` for each recipe: in-process `run_merge`, then a timed `evomerge merge`
    subprocess (imports and all). Every output is deleted once timed."""
    from evomerge.merging.executor import run_merge
    from evomerge.merging.recipe import parse_recipe

    results = {}
    for name, template in RECIPES.items():
        recipe = parse_recipe(template.format(**folders))
        recipe_file = out_root / f"{name}.yaml"
        recipe_file.parent.mkdir(parents=True, exist_ok=True)
        recipe_file.write_text(recipe.to_yaml())
        out = out_root / f"evo-{name}"
        result = results[name] = {"seconds": math.inf, "cli_seconds": math.inf}
        for attempt in range(repeats):
            profiler = cProfile.Profile() if profile and attempt == 0 else None
            settled()
            started = time.perf_counter()
            if profiler:
                profiler.enable()
            summary = run_merge(recipe, out, seed=0)
            if profiler:
                profiler.disable()
            result["seconds"] = min(result["seconds"], time.perf_counter() - started)
            result["bytes"] = summary.bytes_read + summary.bytes_written
            shutil.rmtree(out)
            if profiler:
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
                result["profile"] = text.getvalue()
            settled()
            started = time.perf_counter()
            run = subprocess.run(
                [
                    *(sys.executable, "-c", _PEAK_MEMORY, "merge", str(recipe_file), str(out)),
                    *("--threads", str(torch.get_num_threads())),  # the CLI's default is 1
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            result["cli_seconds"] = min(result["cli_seconds"], time.perf_counter() - started)
            result["peak_gb"] = int(run.stderr.strip().splitlines()[-1]) * 1024 / GB
            shutil.rmtree(out)
    return results


# `evomerge ARGS...`, then its peak resident memory (KiB) as the last line of stderr: VmHWM,
# which starts anew at exec (ru_maxrss would carry this parent process's peak over).
_PEAK_MEMORY = (
    "import re, runpy, sys\n"
    "sys.argv = ['evomerge', *sys.argv[1:]]\n"
    "try:\n    runpy.run_module('evomerge', run_name='__main__')\n"
    "except SystemExit as exc:\n    code = exc.code\nelse:\n    code = 0\n"
    "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1), "
    "file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def run_mergekit(folders: dict[str, Path], out_root: Path, repeats: int) -> dict[str, dict]:
    """For each recipe, best of `repeats`: the merge's seconds inside mergekit, and the wall
    time of the whole process (start-up, imports, one merge), which is what a `mergekit-yaml`
    call costs. One fresh process per merge, like the evomerge CLI runs."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers.mergekit_env import mergekit_python_or_reason, run_driver

    python, reason = mergekit_python_or_reason()
    if python is None:
        raise SystemExit(f"mergekit is not available: {reason} (or pass --skip-mergekit)")
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
    results = {}
    for name, template in RECIPES.items():
        job = {
            "name": name,
            "recipe": template.format(**folders),
            "out": str(out_root / f"mk-{name}"),
            "seed": 0,
            "lora_cache": str(out_root / "mk-lora-cache"),
        }
        result = results[name] = {"seconds": math.inf, "cli_seconds": math.inf}
        for _ in range(repeats):
            settled()
            started = time.perf_counter()
            run = run_driver(python, {"threads": threads, "merges": [job]}, timeout=3600)[name]
            wall = time.perf_counter() - started
            if not run["ok"]:
                raise SystemExit(f"mergekit failed on {name}: {run['error']}")
            result["seconds"] = min(result["seconds"], run["seconds"])
            result["cli_seconds"] = min(result["cli_seconds"], wall)
            result["peak_gb"] = run["peak_kib"] * 1024 / GB
            shutil.rmtree(job["out"])
            shutil.rmtree(
                job["lora_cache"], ignore_errors=True
            )  # each run merges its adapters anew
    return results


# --- a search's set-up: full fine-tunes against adapters -------------------------------------
SEARCH_SPACES = ("task_arithmetic_layers", "dare_ties_layers", "ties_layers")


def measure_search(base: str, models: dict[str, str], space_name: str) -> dict:
    """In this process: compile the space over `models`, apply 3 genomes; bytes kept, apply s."""
    import random
    import re

    from transformers import AutoModelForCausalLM

    from evomerge.io.checkpoint import Checkpoint
    from evomerge.spaces.parameters.candidate import CompiledCandidate
    from evomerge.spaces.parameters.space import SearchSpace, load_space

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    space = SearchSpace(
        load_space(space_name),
        base=base,
        models=models,
        num_layers=Checkpoint(base).num_layers,
        dtype="bfloat16",
    )
    candidate = CompiledCandidate(model, space, seed=0)
    rng, times = random.Random(0), []
    for _ in range(3):
        genome = {g.name: rng.uniform(g.low, g.high) for g in space.genes}
        started = time.perf_counter()
        candidate.apply(genome)
        times.append(time.perf_counter() - started)
    peak_kib = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    return {
        "kept_bytes": sum(_kept_bytes(job.tensor) for job in candidate.jobs),
        "peak_gb": peak_kib * 1024 / GB,
        "apply_s": sorted(times)[1],
    }


def _kept_bytes(tensor) -> int:
    """Bytes one compiled job keeps between trials: its input tensors and, for a resident
    job, what the kernel derived from them (task vectors, ranks, draw tables)."""
    if hasattr(tensor, "resident_bytes"):  # adapters, kept factored
        return tensor.resident_bytes()
    inputs = tensor.inputs
    kept = [
        *inputs.models,
        inputs.base,
        *(v for v in inputs._memo.values() if isinstance(v, torch.Tensor)),
    ]
    if tensor.fused is not None:
        kept += list(tensor.fused._draw_tables.values())
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in kept if t is not None}.values())


def search_memory(folders: dict[str, Path]) -> None:
    """One fresh process per (space, pool): the full fine-tunes, then the adapters."""
    pools = {
        "full": {"ft0": str(folders["ft0"]), "ft1": str(folders["ft1"])},
        "lora": {
            "lora0": f"{folders['base']}+{folders['lora0']}",
            "lora1": f"{folders['base']}+{folders['lora1']}",
        },
    }
    print(f"{'space':<24} {'pool':<5} {'kept GB':>8} {'peak GB':>8} {'apply s':>8}")
    for space in SEARCH_SPACES:
        for kind, models in pools.items():
            code = (
                f"import json, sys; sys.path.insert(0, {str(REPO / 'bench')!r}); "
                "from merge_throughput import measure_search; "
                f"print(json.dumps(measure_search({str(folders['base'])!r}, {models!r}, "
                f"{space!r})))"
            )
            run = subprocess.run(
                [sys.executable, "-c", code], check=True, capture_output=True, text=True
            )
            result = json.loads(run.stdout.strip().splitlines()[-1])
            print(
                f"{space:<24} {kind:<5} {result['kept_bytes'] / GB:>8.3f} "
                f"{result['peak_gb']:>8.2f} {result['apply_s']:>8.3f}"
            )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=0.5e9, help="parameters per model")
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--profile", action="store_true", help="cProfile evomerge's merges")
    parser.add_argument("--workdir", type=Path, help="where models go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the models")
    parser.add_argument(
        "--repeats", type=int, default=1, help="best of this many runs, for both tools"
    )
    parser.add_argument(
        "--lora-rank", type=int, default=16, help="rank of the adapters of the lora row"
    )
    parser.add_argument(
        "--search-memory",
        action="store_true",
        help="measure a search's set-up over full fine-tunes and adapters instead of merges",
    )
    args = parser.parse_args(argv)

    root = args.workdir or Path(tempfile.mkdtemp(prefix="evomerge-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        config, shapes = llama_shapes(args.params)
        numel = sum(math.prod(s) for s in shapes.values())
        print(
            f"models: {numel / 1e6:.0f}M parameters each (bf16, {config['num_hidden_layers']} "
            f"layers, hidden {config['hidden_size']}), base + 2; torch threads "
            f"{torch.get_num_threads()}"
        )
        started = time.perf_counter()
        folders = write_models(root / "models", args.params)
        folders.update(write_adapters(root / "models", folders["base"], args.lora_rank))
        print(f"wrote models in {time.perf_counter() - started:.1f} s under {root}")
        if args.search_memory:
            search_memory(folders)
            return
        bandwidth = copy_bandwidth()
        print(f"memory copy bandwidth: {bandwidth / GB:.1f} GB/s (read + write)")

        evo = run_evomerge(folders, root / "out", args.profile, args.repeats)
        mk = {} if args.skip_mergekit else run_mergekit(folders, root / "out", args.repeats)
        print(
            f"{'recipe':<10} {'evomerge s':>10} {'GB/s':>6} {'% copy':>7} {'mergekit s':>10} "
            f"{'ratio':>6} {'evomerge CLI s':>14} {'mergekit CLI s':>14} {'ratio CLI':>9}"
            f" {'evomerge GB':>11} {'mergekit GB':>11}"
        )
        for name, result in evo.items():
            rate = result["bytes"] / result["seconds"]
            line = (
                f"{name:<10} {result['seconds']:>10.1f} {rate / GB:>6.2f} "
                f"{100 * rate / bandwidth:>6.1f}%"
            )
            if name in mk:
                theirs = mk[name]
                line += (
                    f" {theirs['seconds']:>10.1f} {theirs['seconds'] / result['seconds']:>5.1f}x"
                )
                line += f" {result['cli_seconds']:>14.1f} {theirs['cli_seconds']:>14.1f}"
                line += f" {theirs['cli_seconds'] / result['cli_seconds']:>8.1f}x"
                line += f" {result['peak_gb']:>11.2f} {theirs['peak_gb']:>11.2f}"
            print(line)
        for name, result in evo.items():
            if "profile" in result:
                print(f"\n--- evomerge {name}: top functions by own time ---\n{result['profile']}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
