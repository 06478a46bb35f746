"""The memory plan (`evomerge plan`, evomerge/search/memory_plan.py): exact bytes from a tiny
pool's headers, the command's output, the search's refusal, and no tensor data read."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from evomerge.cli import cli

BATCH, LENGTH = 4, 16


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict[str, Path]:
    import torch
    from helpers.tiny_models import build_tiny_pool

    return build_tiny_pool(tmp_path_factory.mktemp("plan") / "pool", dtype=torch.bfloat16)


def _config(tmp_path: Path, pool: dict[str, Path], space: str, dtype="float32") -> Path:
    config = {
        "pool": {
            "base": str(pool["base"]),
            "models": {name: str(pool[name]) for name in ("ft0", "ft1", "ft2")},
            "dtype": dtype,
        },
        "space": space,
        "fitness": {"tasks": ["x"], "batch_size": BATCH, "max_length": LENGTH},
    }
    path = tmp_path / f"{space}-{dtype}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _header_shapes(folder: Path) -> dict[str, list[int]]:
    """Shapes read straight from the safetensors header, independently of evomerge."""
    shapes = {}
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def _plan(path: Path, memory: int = 10**12, host_memory: int = 10**12):
    from evomerge.search.config import load_run_config
    from evomerge.search.memory_plan import plan_memory

    return plan_memory(load_run_config(path), memory=memory, host_memory=host_memory)


def _activations(base: Path, itemsize: int) -> int:
    config = json.loads((base / "config.json").read_text())
    tokens = BATCH * LENGTH
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    kv = tokens * config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim
    return kv * itemsize + tokens * config["vocab_size"] * 4


@pytest.mark.parametrize("dtype, size", [("float32", 4), ("bfloat16", 2)])
def test_ties_plan_is_exact_bytes_from_the_headers(pool, tmp_path, dtype, size):
    numel = sum(math.prod(s) for s in _header_shapes(pool["base"]).values())
    plan = _plan(_config(tmp_path, pool, "ties_layers", dtype))
    got = {item.label: item.bytes for item in plan.items}
    assert got == {
        "base": numel * size,
        "task vectors": 3 * numel * size,
        "TIES ranks": 3 * numel * 4,  # int32 ranks, whatever the dtype
        "live model": numel * size,
        "activations": _activations(pool["base"], size),
    }
    assert plan.model_bytes == numel * size and plan.sources == 3
    assert plan.total == sum(got.values())
    # a trial reads the base, three task vectors and their ranks, and writes the model once
    assert plan.trial_bytes == (1 + 3 + 1) * numel * size + 3 * numel * 4


def test_task_arithmetic_keeps_no_ranks_and_dare_no_tables_below_1m_elements(pool, tmp_path):
    numel = sum(math.prod(s) for s in _header_shapes(pool["base"]).values())
    for space in ("task_arithmetic_layers", "dare_ties_layers"):
        got = {i.label: i.bytes for i in _plan(_config(tmp_path, pool, space)).items}
        assert got["task vectors"] == 3 * numel * 4
        assert "TIES ranks" not in got and "DARE tables" not in got and "sources" not in got


def test_regmean_plans_projections_and_statistics(pool, tmp_path):
    shapes = _header_shapes(pool["base"])
    numel = sum(math.prod(s) for s in shapes.values())
    grams = max(  # one tensor's at a time: read when its projections are made
        (s[0] if "embed" in name else s[1] * s[1]) * 4 for name, s in shapes.items() if len(s) == 2
    )
    got = {i.label: i.bytes for i in _plan(_config(tmp_path, pool, "regmean_layers")).items}
    assert got["task vectors"] == 3 * numel * 4
    assert got["projected"] == 3 * numel * 4  # float32 whatever the dtype
    assert got["statistics"] == 3 * grams


def test_the_plan_mirrors_the_kernels_constants():
    from evomerge.kernel import cpu, task_vectors
    from evomerge.methods.random_fields import SCALE
    from evomerge.search import memory_plan

    assert memory_plan.DRAW_TABLE_MIN == task_vectors.DRAW_TABLE_MIN
    assert memory_plan.DRAW_TABLE_BYTES == (SCALE + 1) * 8
    assert memory_plan.FUSED_RULES == task_vectors.FUSED_RULES
    assert memory_plan.MAX_MODELS == cpu.MAX_MODELS
    assert memory_plan.MAGNITUDE_TABLE_MIN == task_vectors.MAGNITUDE_TABLE_MIN
    assert memory_plan.MAGNITUDE_TABLE_BYTES == cpu.MAGNITUDE_TABLE_ENTRIES * 8


def test_ties_keeps_magnitude_tables_and_no_ranks_on_a_gpu(tmp_path):
    """TIES in a search on the CPU keeps, per source, a 256 KiB magnitude table for each tensor
    of 65,536 elements or more and int32 ranks (no larger) for the rest; on a GPU the same
    tables and no ranks (each trial's cut is found on the device), with a small workspace."""
    from evomerge.search.memory_plan import MAGNITUDE_TABLE_BYTES, MAGNITUDE_TABLE_MIN

    pool = {name: tmp_path / name for name in ("base", "ft0", "ft1", "ft2")}
    shape = dict(hidden=256, inter=1024, layers=2, vocab=512, kv=4)
    for folder in pool.values():
        _sparse_llama(folder, **shape)
    shapes = _header_shapes(pool["base"]).values()
    large = [math.prod(s) for s in shapes if math.prod(s) >= MAGNITUDE_TABLE_MIN]
    small = [math.prod(s) for s in shapes if math.prod(s) < MAGNITUDE_TABLE_MIN]
    assert large and small and MAGNITUDE_TABLE_MIN in large  # q and o: exactly at the bound
    path = _config(tmp_path, pool, "ties_layers", "bfloat16")
    got = {i.label: i.bytes for i in _plan(path).items}
    assert got["TIES tables"] == 3 * len(large) * MAGNITUDE_TABLE_BYTES
    assert got["TIES ranks"] == 3 * sum(small) * 4
    assert got["TIES tables"] <= 3 * sum(large) * 4  # never more than ranks would be
    config = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(config | {"device": "cuda:0"}))
    got = {i.label: i.bytes for i in _plan(path).items}
    assert "TIES ranks" not in got and got["TIES tables"] == 3 * len(large) * MAGNITUDE_TABLE_BYTES
    # one tensor's: its per-block counts, and a histogram's slice where there is no table
    assert 0 < got["TIES selection"] <= 16 * max(small) + 12 * max(large) // 1024 + 12


def test_plan_prints_each_item_and_the_total(pool, tmp_path):
    path = _config(tmp_path, pool, "ties_layers")
    result = CliRunner().invoke(cli, ["plan", str(path), "--memory", "1GB", "--no-bandwidth"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("memory plan: ties, 3 sources, merge dtype float32, device cpu")
    for label in ("base", "task vectors", "TIES ranks", "live model", "activations", "total"):
        assert any(line.split()[0:2][0] == label.split()[0] for line in lines[1:]), label
    assert any(line.startswith("one trial moves") for line in lines)
    assert lines[-1].startswith("fits: 1.17 MB of 1.00 GB available (given with --memory)")


def test_plan_says_it_does_not_fit_and_exits_2(pool, tmp_path):
    path = _config(tmp_path, pool, "ties_layers")
    result = CliRunner().invoke(cli, ["plan", str(path), "--memory", "1MB", "--no-bandwidth"])
    assert result.exit_code == 2
    last = result.output.splitlines()[-1]
    assert "would hold 1.17 MB on cpu but 1.00 MB is available" in last
    assert "pool dtype bfloat16 would need" in last and "2 sources would fit" in last


def test_search_refuses_a_plan_that_does_not_fit_before_anything_loads(pool, tmp_path):
    path = _config(tmp_path, pool, "ties_layers")
    run_dir = tmp_path / "runs" / "r"
    result = subprocess.run(
        [sys.executable, "-m", "evomerge", "search", str(path), "--run-dir", str(run_dir)]
        + ["--memory", "100KB"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the search would hold 1.17 MB")
    assert "the largest item is the task vectors (421.25 KB)" in lines[0]
    assert "--no-memory-check" in lines[0]
    assert not (tmp_path / "runs").exists()  # nothing written


def test_plan_reads_headers_only(pool, tmp_path, monkeypatch):
    """Tensor data replaced by NaN bytes (a load would refuse it) and safetensors' reader
    spied on: the plan is the same."""
    import shutil

    import safetensors

    from evomerge.io import checkpoint

    copied = {}
    for name, folder in pool.items():
        copied[name] = tmp_path / "pool" / name
        shutil.copytree(folder, copied[name])
        for file in copied[name].glob("*.safetensors"):
            with open(file, "r+b") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                start = 8 + length
                size = file.stat().st_size - start
                handle.seek(start)
                handle.write(b"\xff" * size)
    expected = _plan(_config(tmp_path, pool, "ties_layers"))

    def refuse(*args, **kwargs):
        raise AssertionError("the plan read tensor data")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(checkpoint.Checkpoint, "tensor", refuse)
    got = _plan(_config(tmp_path, copied, "ties_layers"))
    assert got.items == expected.items and got.trial_bytes == expected.trial_bytes


def test_methods_run_by_torch_ops_keep_their_sources(pool, tmp_path):
    numel = sum(math.prod(s) for s in _header_shapes(pool["base"]).values())
    plan = _plan(_config(tmp_path, pool, "linear_global"))
    got = {i.label: i.bytes for i in plan.items}
    assert got["sources"] == 3 * numel * 4  # linear merges the models themselves: no base
    assert "base" not in got and "task vectors" not in got


def test_a_method_per_group_holds_one_set_of_inputs_per_method(pool, tmp_path):
    numel = sum(math.prod(s) for s in _header_shapes(pool["base"]).values())
    plan = _plan(_config(tmp_path, pool, "method_per_group"))  # task_arithmetic | ties
    got = {i.label: i.bytes for i in plan.items}
    assert got["base"] == 2 * numel * 4 and got["task vectors"] == 6 * numel * 4
    assert got["TIES ranks"] == 3 * numel * 4


def test_the_search_check_passes_a_plan_that_fits(pool, tmp_path):
    from evomerge.cli.search_cmd import _check_memory
    from evomerge.errors import UserError
    from evomerge.search.config import load_run_config

    config = load_run_config(_config(tmp_path, pool, "ties_layers"))
    _check_memory(config, "2MB")
    with pytest.raises(UserError, match=r"^the search would hold 1\.17 MB on cpu but 1\.00 MB"):
        _check_memory(config, "1MB")


def test_free_memory_is_read_from_the_device(monkeypatch):
    import torch

    from evomerge.errors import UserError
    from evomerge.search.memory_plan import free_memory

    free, where = free_memory("cpu")
    assert free > 0 and "MemAvailable" in where
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA GPU is visible"):
        free_memory("cuda:1")
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="does not exist: torch sees 2 GPU"):
        free_memory("cuda:2")
    monkeypatch.setattr(
        torch.cuda, "mem_get_info", lambda i: (asked.append(i), (7 << 30, 8 << 30))[1]
    )
    assert free_memory("cuda:1") == (7 << 30, "free on cuda:1") and asked == [1]


def _sparse_llama(folder: Path, *, hidden=4096, inter=14336, layers=32, vocab=128256, kv=8):
    """A Llama-3-8B shaped checkpoint whose header is real and whose data was never written
    (a sparse file): only a plan that reads no tensor can use it."""
    heads, shapes = 32, {"model.embed_tokens.weight": [vocab, hidden]}
    shapes |= {"model.norm.weight": [hidden], "lm_head.weight": [vocab, hidden]}
    for i in range(layers):
        p, head_dim = f"model.layers.{i}.", hidden // heads
        shapes |= {p + f"self_attn.{x}_proj.weight": [hidden, hidden] for x in "qo"}
        shapes |= {p + f"self_attn.{x}_proj.weight": [kv * head_dim, hidden] for x in "kv"}
        shapes |= {p + f"mlp.{x}_proj.weight": [inter, hidden] for x in ("gate", "up")}
        shapes |= {p + "mlp.down_proj.weight": [hidden, inter]}
        shapes |= {p + f"{x}_layernorm.weight": [hidden] for x in ("input", "post_attention")}
    header, offset = {}, 0
    for name, shape in shapes.items():
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + 0]}
        offset += 2 * math.prod(shape)
        header[name]["data_offsets"][1] = offset
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    folder.mkdir(parents=True)
    with open(folder / "model.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)) + blob)
        handle.truncate(8 + len(blob) + offset)
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=hidden)
    config |= dict(intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads)
    config |= dict(num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=False)
    (folder / "config.json").write_text(json.dumps(config))
    return offset


def test_three_8b_fine_tunes_plan_from_headers_alone(tmp_path):
    """Real Llama-3-8B shapes, no weights: 5 model-sizes and the allowance for task arithmetic
    in bfloat16, which an 80 GB GPU cannot hold; two sources can."""
    pool = {name: tmp_path / name for name in ("base", "ft0", "ft1", "ft2")}
    size = [_sparse_llama(folder) for folder in pool.values()][0]
    assert size == 16_060_522_496  # 8.03B parameters in bfloat16
    path = _config(tmp_path, pool, "task_arithmetic_layers", "bfloat16")
    result = CliRunner().invoke(cli, ["plan", str(path), "--memory", "80GB", "--no-bandwidth"])
    assert result.exit_code == 2
    lines = result.output.splitlines()
    assert "one model-size = 16.06 GB" in lines[0]
    assert lines[2].split()[:4] == ["task", "vectors", "48.18", "GB"]
    assert (
        lines[-1].startswith("the search would hold 80.34 GB")
        and "2 sources would fit" in lines[-1]
    )
    ties = {
        i.label: i.bytes for i in _plan(_config(tmp_path, pool, "ties_layers", "bfloat16")).items
    }
    # TIES on the CPU: magnitude tables, 0.4% of the task vectors (int32 ranks would be 200%)
    assert ties["TIES tables"] + ties.get("TIES ranks", 0) < 0.01 * ties["task vectors"]
    # and on a GPU the same, no ranks, and the cut's workspace: the 2^29-element embedding's
    # per-block counts; so TIES holds what task arithmetic holds, within 0.5%
    gpu = _plan(_on_gpu(_config(tmp_path, pool, "ties_layers", "bfloat16")), 80 * 10**9)
    got = {i.label: i.bytes for i in gpu.device_tier.items}
    assert "TIES ranks" not in got and got["TIES tables"] == ties["TIES tables"]
    assert got["TIES selection"] == -(-128256 * 4096 // 1024) * 12
    assert 80.34e9 < gpu.device_tier.total < 80.34e9 * 1.005
    assert gpu.tier == "host" and gpu.fits  # the host tier: no ranks staged either
    assert gpu.item("staging").bytes == _staged_8b(size)[0]


def test_the_allowance_takes_the_models_context_when_max_length_is_unset():
    from evomerge.search.memory_plan import DEFAULT_SEQUENCE, sequence_length

    assert sequence_length({"max_position_embeddings": 64}, None) == 64
    assert sequence_length({"max_position_embeddings": 8192}, None) == DEFAULT_SEQUENCE
    assert sequence_length({}, None) == DEFAULT_SEQUENCE
    assert sequence_length({"max_position_embeddings": 64}, 1000) == 1000


@pytest.mark.parametrize("command", ["resume", "worker"])
def test_resume_and_worker_check_the_plan_too(pool, tmp_path, command):
    """A run folder made on a large machine, continued on a small one: refused in one sentence
    before anything loads, the run folder as it was."""
    from evomerge.search.config import load_run_config
    from evomerge.search.run_folder import build_space, write_run_folder
    from evomerge.search.study import create_study, open_run_storage

    run_dir = tmp_path / "runs" / "r"
    config = load_run_config(_config(tmp_path, pool, "ties_layers"))
    write_run_folder(config, run_dir)  # as `search --trials 0` leaves it
    create_study(config, open_run_storage(config, run_dir), build_space(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    before = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    result = subprocess.run(
        [sys.executable, "-m", "evomerge", command, str(run_dir), "--memory", "100KB"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the search would hold"), lines
    after = sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    assert after == before


# --- tiers: the device tier, or the inputs in host memory streamed through a staging buffer ----
def _llama_8b_pool(tmp_path: Path) -> tuple[dict[str, Path], int]:
    pool = {name: tmp_path / name for name in ("base", "ft0", "ft1", "ft2")}
    return pool, [_sparse_llama(folder) for folder in pool.values()][0]


def _on_gpu(path: Path, **search) -> Path:
    config = yaml.safe_load(path.read_text())
    config |= {"device": "cuda:0", "search": search}
    path.write_text(yaml.safe_dump(config))
    return path


def _staged_8b(size: int, *, sources: int = 3) -> tuple[int, int]:
    """The 8B pool's staging buffer on a GPU (its largest two consecutive tensors' operands:
    the embedding and layer 0's first tensor), and what a trial copies (every operand)."""
    hidden, vocab = 4096, 128256
    embedding = (sources + 1) * vocab * hidden * 2
    first = (sources + 1) * hidden * hidden * 2  # q_proj (any tensor after it is no larger)
    return embedding + first, (sources + 1) * size


def test_three_8b_fine_tunes_fit_one_80gb_gpu_in_the_host_tier_only(tmp_path):
    """Task arithmetic over three Llama-3-8B-shaped bf16 fine-tunes (headers only) on one 80 GB
    GPU with the vLLM backend: the device tier would hold more than 80 GB (the base and three
    task vectors alone are 64.24 GB), so `auto` picks the host tier, whose GPU holds the live
    model, vLLM's weights, the allowance and a staging buffer of two tensors' operands; host
    memory holds the base and the task vectors."""
    pool, size = _llama_8b_pool(tmp_path)
    path = _on_gpu(_config(tmp_path, pool, "task_arithmetic_layers", "bfloat16"))
    config = yaml.safe_load(path.read_text())
    config["fitness"]["backend"] = "vllm"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(
        cli, ["plan", str(path), "--memory", "80GB", "--host-memory", "256GB", "--no-bandwidth"]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    plan = _plan(path, memory=80 * 10**9)
    device = human(plan.device_tier.total)
    assert plan.device_tier.total > 80 * 10**9
    assert lines[0].endswith(f"tier host (auto: the device tier would hold {device} of 80.00 GB)")
    staging, link = _staged_8b(size)
    got = {item.label: item.bytes for item in plan.items}
    assert plan.tier == "host" and set(got) == {
        "live model",
        "engine weights",
        "staging",
        "activations",
    }
    assert got["engine weights"] == size and got["staging"] == staging
    assert got["live model"] < size / 8  # vLLM: the merge goes into the engine through buffers
    assert {item.label: item.bytes for item in plan.host_items} == {
        "base": size,
        "task vectors": 3 * size,
    }
    assert plan.link_bytes == link  # the base and three task vectors, once a trial
    assert lines[-1].startswith(f"fits: {human(plan.total)} of 80.00 GB available")
    assert "in host memory of 256.00 GB" in lines[-1]
    forced = _on_gpu(path, tier="device")
    result = CliRunner().invoke(
        cli, ["plan", str(forced), "--memory", "80GB", "--host-memory", "256GB", "--no-bandwidth"]
    )
    assert result.exit_code == 2 and f"the search would hold {device}" in result.output
    assert (
        f"`search.tier: host` (or auto) would hold {human(plan.total)} on cuda:0" in result.output
    )


def test_a_24gb_gpu_picks_the_host_tier(tmp_path):
    pool, size = _llama_8b_pool(tmp_path)
    path = _on_gpu(_config(tmp_path, pool, "task_arithmetic_layers", "bfloat16"))
    plan = _plan(path, memory=24 * 10**9)
    assert plan.tier == "host" and plan.fits
    staging, _ = _staged_8b(size)
    assert plan.total == size + staging + plan.item("activations").bytes
    assert plan.device_tier.total > 80 * 10**9
    dare = _plan(_on_gpu(_config(tmp_path, pool, "dare_ties_layers", "bfloat16")), 24 * 10**9)
    assert dare.tier == "host" and dare.fits  # its draw tables are in host memory either way


def test_a_pool_that_fits_neither_tier_is_refused_in_one_sentence(tmp_path):
    """A 16 GB GPU cannot hold even the 8B live model: exit 2, one sentence naming both tiers."""
    pool, _ = _llama_8b_pool(tmp_path)
    path = _on_gpu(_config(tmp_path, pool, "task_arithmetic_layers", "bfloat16"))
    result = CliRunner().invoke(
        cli, ["plan", str(path), "--memory", "16GB", "--host-memory", "256GB", "--no-bandwidth"]
    )
    assert result.exit_code == 2
    last = result.output.splitlines()[-1]
    assert last.startswith("the search fits neither tier: the device tier would hold 80.34 GB")
    assert "the host tier" in last and "but 16.00 GB is available on cuda:0" in last
    assert last.count(". ") == 0 and last.endswith("--no-memory-check)")


def test_host_memory_too_small_for_the_host_tier_is_refused(tmp_path):
    pool, _ = _llama_8b_pool(tmp_path)
    path = _on_gpu(_config(tmp_path, pool, "task_arithmetic_layers", "bfloat16"), tier="host")
    plan = _plan(path, memory=80 * 10**9, host_memory=32 * 10**9)
    assert not plan.fits and "64.24 GB in host memory (32.00 GB available)" in plan.refusal()


def test_the_cpu_runs_the_device_tier_unless_the_host_tier_is_forced(pool, tmp_path):
    path = _config(tmp_path, pool, "ties_layers")
    assert _plan(path).tier == "device"
    config = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(config | {"search": {"tier": "host"}}))
    plan = _plan(path, memory=10**12)
    assert plan.tier == "host" and plan.shared and plan.item("staging").bytes > 0
    # one memory: both tiers' items count against it
    plan.available = plan.total + plan.host_total - 1
    assert not plan.fits


def test_the_plan_mirrors_the_staging_buffer():
    from evomerge.kernel import task_vectors
    from evomerge.search import memory_plan

    assert memory_plan.STAGE_ALIGN == task_vectors.STAGE_ALIGN
    for sizes in ([10, 40, 5, 30], [7], []):
        for pairs in (False, True):
            assert memory_plan.staging_bytes(sizes, pairs=pairs) == task_vectors.staging_bytes(
                sizes, pairs=pairs
            )


def human(size: float) -> str:
    from evomerge.search.memory_plan import human as plan_human

    return plan_human(size)


def test_a_bad_host_memory_size_is_one_sentence(pool, tmp_path):
    path = _config(tmp_path, pool, "ties_layers")
    result = subprocess.run(
        [sys.executable, "-m", "evomerge", "plan", str(path), "--host-memory", "lots"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1:] == [
        "error: cannot read size 'lots'; write it like 5GB or 500MB"
    ]
