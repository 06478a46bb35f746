"""Input statistics for spaces whose method reads them (RegMean), written for tests.

`give_statistics(space, folder)` writes, for every model the space merges, a statistics file
of random symmetric positive-definite Gram matrices (one per 2-D weight; the embedding gets
positive per-row frequencies) and points the space's recipes at them, as `evomerge search`
does with the statistics it collects from the dev documents.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_statistics(model_folder: str, out: Path) -> Path:
    from evomerge.io.adapters import open_checkpoint

    checkpoint = open_checkpoint(model_folder)
    stats = {}
    for name in checkpoint.names:
        shape = checkpoint.shape(name)
        if len(shape) != 2:
            continue
        gen = torch.Generator().manual_seed(zlib.crc32(f"{model_folder}:{name}".encode()))
        if "embed" in name:
            stats[name] = torch.rand(shape[0], generator=gen) + 0.1
        else:
            x = torch.randn(2 * shape[1], shape[1], generator=gen)
            stats[name] = x.T @ x / x.shape[0]
    save_file(stats, str(out))
    return out


def give_statistics(space, folder: Path):
    """`space` with statistics for its models (no change for a method that reads none)."""
    if not getattr(getattr(space, "method", None), "statistics", False):
        return space
    Path(folder).mkdir(parents=True, exist_ok=True)
    space.statistics = {
        path: str(write_statistics(path, Path(folder) / f"{name}.safetensors"))
        for name, path in space.models.items()
    }
    return space
