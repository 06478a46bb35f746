"""Checkpoint reading: sharded folders, hub ids without a hub."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from evomerge.errors import UserError
from evomerge.io.checkpoint import Checkpoint
from evomerge.merging.executor import run_merge
from evomerge.merging.recipe import parse_recipe


def test_sharded_folders_read_and_write_the_same_tensors(tmp_path):
    from helpers.tiny_models import build_tiny_pool

    torch.set_num_threads(1)
    pool = build_tiny_pool(tmp_path / "pool", n_models=1)
    copy = parse_recipe(f"merge_method: passthrough\nmodels: [{{model: {pool['ft0']}}}]")
    run_merge(copy, tmp_path / "sharded", shard_bytes=20_000)  # many small shards
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3 and all((tmp_path / "sharded" / s).exists() for s in shards)

    original = load_file(str(pool["ft0"] / "model.safetensors"))
    sharded = Checkpoint(str(tmp_path / "sharded"))
    assert sorted(sharded.names) == sorted(original)
    assert all(torch.equal(sharded.tensor(n), original[n]) for n in original)

    # and a merge that reads the sharded folder gives the single-file result
    again = parse_recipe(f"merge_method: passthrough\nmodels: [{{model: {tmp_path / 'sharded'}}}]")
    run_merge(again, tmp_path / "again")
    merged = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(torch.equal(merged[n], original[n]) for n in original)


def test_a_hub_id_without_a_hub_is_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not a local folder and could not be fetched"):
        Checkpoint("some-org/some-model")


def test_writer_reuses_a_buffer_only_once_its_bytes_are_written(tmp_path, monkeypatch):
    """Results merged into lent buffers, with a writer thread slower than the merge (the queue
    fills up): every tensor on disk is the one merged for it, none overwritten by a later one."""
    import time

    from evomerge.io import output
    from evomerge.io.output import ShardedWriter, TensorSpec

    slow_write = output.write_bytes

    def write_slowly(handle, tensor):
        time.sleep(0.005)
        slow_write(handle, tensor)

    monkeypatch.setattr(output, "write_bytes", write_slowly)
    layout = [TensorSpec(f"t{i}", (64, 32), torch.float32) for i in range(40)]
    layout.insert(7, TensorSpec("odd", (3,), torch.float32))
    writer = ShardedWriter(tmp_path, layout, max_shard_bytes=1 << 40)
    expected = {}
    for spec in layout:
        buffer = writer.destination()
        if spec.name == "t5":  # a method that returns a new tensor instead
            value = torch.full(spec.shape, -5.0)
        else:
            value = buffer
            value.fill_(float(len(expected)))
        expected[spec.name] = value.clone()
        writer.add(spec.name, value)
    writer.finish()
    written = load_file(str(tmp_path / "model.safetensors"))
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[name], expected[name]) for name in expected)
