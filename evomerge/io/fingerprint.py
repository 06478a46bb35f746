"""Cheap fingerprints of model folders, so a resumed run can tell that its pool changed.

Hashing every byte of a multi-GB model would take minutes; a fingerprint hashes each weight
file's size, its safetensors header (names, shapes, dtypes, offsets) and three 64 KiB samples
of its data. A re-trained or re-saved model changes it; a copied folder does not.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from evomerge.io.checkpoint import reference_parts

_SAMPLE = 1 << 16


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


def folder_fingerprint(folder: str | Path) -> str:
    parts = reference_parts(str(folder))
    if len(parts) > 1:  # base+adapter: both folders
        return "+".join(map(folder_fingerprint, parts))
    digest = hashlib.sha256()
    for file in sorted(Path(folder).glob("*.safetensors")):
        digest.update(file.name.encode())
        digest.update(file_fingerprint(file).encode())
    return digest.hexdigest()[:32]


def pool_fingerprints(config) -> dict[str, str]:
    """{"base": ..., "<model name>": ...} for a run config's pool."""
    out = {"base": folder_fingerprint(config.pool.base)}
    out.update({name: folder_fingerprint(path) for name, path in config.pool.models.items()})
    return out
