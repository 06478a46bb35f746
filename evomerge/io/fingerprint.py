"""Cheap fingerprints of model folders, so a resumed run can tell that its pool changed.

Hashing every byte of a multi-GB model would take minutes; a fingerprint hashes each weight
file's size, its safetensors header (names, shapes, dtypes, offsets) and three 64 KiB samples
of its data. A re-trained or re-saved model changes it; a copied folder does not.

Everything else that changes what a trial scores is hashed whole (it is small): a model's
config, generation config and tokenizer files, an adapter's config, and the files of the
fitness tasks (their YAMLs, the code they import and their data; large data files sampled like
weights). Such fingerprints carry the prefix `VERSION`; a run started before them kept the
weights' alone, and is checked on those (`weights_only`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from evomerge.io.checkpoint import METADATA_FILES, reference_parts

_SAMPLE = 1 << 16
VERSION = "2:"  # weights, configs, tokenizer; unprefixed: weights only (older runs)
_SMALL = 1 << 22  # files up to this size are hashed whole


def file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        digest.update(handle.read(min(header_len, size)))
        for offset in (8 + header_len, size // 2, max(0, size - _SAMPLE)):
            handle.seek(offset)
            digest.update(handle.read(_SAMPLE))
    return digest.hexdigest()[:32]


def _content_fingerprint(path: Path) -> str:
    """A small file's whole content; a large one sampled like weights."""
    if path.stat().st_size > _SMALL:
        return file_fingerprint(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:32]


def folder_fingerprint(folder: str | Path, *, weights_only: bool = False) -> str:
    """The weights of a model folder (or `base+adapter`) and, unless `weights_only`, the
    files besides them that change its outputs: config, tokenizer, adapter config."""
    parts = reference_parts(str(folder))
    if len(parts) > 1:  # base+adapter: both folders
        return "+".join(folder_fingerprint(p, weights_only=weights_only) for p in parts)
    digest = hashlib.sha256()
    for file in sorted(Path(folder).glob("*.safetensors")):
        digest.update(file.name.encode())
        digest.update(file_fingerprint(file).encode())
    if weights_only:
        return digest.hexdigest()[:32]
    for name in (*METADATA_FILES, "adapter_config.json"):
        if (Path(folder) / name).is_file():
            digest.update(name.encode())
            digest.update(_content_fingerprint(Path(folder) / name).encode())
    return VERSION + digest.hexdigest()[:32]


def tasks_fingerprint(task_paths) -> str:
    """Every file under the fitness task folders: task YAMLs, the code their `!function`s
    import, their data. (lm-eval's built-in tasks, with no task path, are not covered.)"""
    digest = hashlib.sha256()
    for root in map(Path, task_paths):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            if "__pycache__" in file.parts:  # written by Python itself when code is imported
                continue
            digest.update(str(file.relative_to(root) if file != root else file.name).encode())
            digest.update(_content_fingerprint(file).encode())
    return VERSION + digest.hexdigest()[:32]


def pool_fingerprints(config, *, weights_only: bool = False) -> dict[str, str]:
    """{"base": ..., "<model name>": ..., "task files": ...} for a run config's pool and tasks;
    `weights_only`: as runs kept them before `VERSION` (the models' weights alone)."""
    models = {"base": config.pool.base, **config.pool.models}
    out = {name: folder_fingerprint(p, weights_only=weights_only) for name, p in models.items()}
    if not weights_only:
        out["task files"] = tasks_fingerprint(config.fitness.task_paths)
    return out
