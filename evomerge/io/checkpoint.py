"""Reading model checkpoints: lazy, per-tensor, safetensors only by default.

A `Checkpoint` is a local Hugging Face model folder (one or many `.safetensors` shards, with or
without `model.safetensors.index.json`). Tensors are read one at a time from memory-mapped
files, so a merge holds a few tensors per source in memory, never whole models.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.errors import UserError

if TYPE_CHECKING:
    import torch

LOG = logging.getLogger(__name__)

# `model.layers.12.mlp...`, `transformer.h.3.attn...`, `blocks.0...`
_LAYER_RE = re.compile(r"(^|\.)(layers|h|blocks|block|layer)\.(\d+)\.")

# Above this a header is not a real safetensors header but an attack or a corrupt file.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


@lru_cache(maxsize=1)
def _torch_dtypes() -> dict:
    """safetensors dtype codes -> torch dtypes."""
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool,
    }  # fmt: skip


def layer_index(tensor_name: str) -> int | None:
    """The transformer layer a tensor belongs to, or None for embeddings, norms, heads."""
    match = _LAYER_RE.search(tensor_name)
    return int(match.group(3)) if match else None


def with_layer_index(tensor_name: str, index: int) -> str:
    """`tensor_name` with its layer number replaced by `index`."""
    return _LAYER_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}.{index}.", tensor_name, count=1)


class Checkpoint:
    """One model folder: tensor names, shapes and dtypes up front; data on demand."""

    def __init__(self, reference: str, *, allow_pickle: bool = False):
        self.reference = reference
        self.path = resolve_model_path(reference)
        self._files = _tensor_files(self.path, allow_pickle=allow_pickle)
        self._handles: dict[Path, object] = {}
        self._name_to_file: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in self._files:
            if file.suffix == ".safetensors":
                header = _read_header(file)
            else:  # --allow-pickle: loaded once, weights only, memory-mapped
                self._handles[file] = _load_pickle(file)
                header = {
                    n: (tuple(t.shape), _dtype_code(t.dtype))
                    for n, t in self._handles[file].items()
                }
            for name, (shape, dtype) in header.items():
                self._name_to_file[name] = file
                self._meta[name] = (shape, dtype)

    def __repr__(self) -> str:
        return f"Checkpoint({self.reference!r})"

    @property
    def names(self) -> list[str]:
        return list(self._name_to_file)

    def __contains__(self, name: str) -> bool:
        return name in self._name_to_file

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype_name(self, name: str) -> str:
        """The safetensors dtype code of a tensor: F32, BF16, F16, ..."""
        return self._meta[name][1]

    def torch_dtype(self, name: str) -> torch.dtype:
        return _torch_dtypes()[self.dtype_name(name)]

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read from its (memory-mapped) file."""
        from safetensors import SafetensorError, safe_open

        file = self._name_to_file[name]
        handle = self._handles.get(file)
        if isinstance(handle, dict):  # a pickle checkpoint's state dict
            return handle[name]
        try:
            if handle is None:
                handle = self._handles[file] = safe_open(str(file), framework="pt")
            return handle.get_tensor(name)
        except SafetensorError as exc:
            raise UserError(f"cannot read tensor {name!r} from {file}: {exc}") from None

    @cached_property
    def config(self) -> dict:
        """The model's `config.json` ({} when the folder has none)."""
        file = self.path / "config.json"
        if not file.exists():
            return {}
        try:
            return json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{file} is not valid JSON: {exc}") from None

    @cached_property
    def num_layers(self) -> int:
        """Transformer layers: from the config, else from the tensor names."""
        configured = self.config.get("num_hidden_layers") or self.config.get("n_layer")
        if configured:
            return int(configured)
        indices = [i for i in map(layer_index, self.names) if i is not None]
        return max(indices) + 1 if indices else 0

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self._files)


def check_compatible(checkpoints: dict[str, Checkpoint]) -> None:
    """Refuse to merge models that are not one architecture with one vocabulary.

    Compared with the first model: the config's `model_type` and `architectures` (where both
    configs give them), the vocabulary size (config `vocab_size`), and the set of tensor names
    with layer numbers left out (so models with different layer counts can still be sliced).
    Tensor shapes are checked per tensor by the planner.
    """
    (first_ref, first), *others = checkpoints.items()
    for ref, other in others:
        for key in ("model_type", "architectures"):
            a, b = first.config.get(key), other.config.get(key)
            if a is not None and b is not None and a != b:
                raise UserError(
                    f"models {first_ref!r} ({key} {a}) and {ref!r} ({key} {b}) have different "
                    "architectures and cannot be merged"
                )
        a, b = first.config.get("vocab_size"), other.config.get("vocab_size")
        if a is not None and b is not None and a != b:
            raise UserError(
                f"models {first_ref!r} ({a} tokens) and {ref!r} ({b} tokens) have different "
                "vocabularies; evomerge merges only models that share one tokenizer"
            )
        mine, theirs = _name_templates(first.names), _name_templates(other.names)
        if mine != theirs:
            extra = sorted(theirs - mine)
            if extra:
                what = f"{ref!r} has tensor {extra[0]!r}, which {first_ref!r} lacks"
            else:
                what = f"{ref!r} lacks tensor {sorted(mine - theirs)[0]!r}, which {first_ref!r} has"
            raise UserError(
                f"models {first_ref!r} and {ref!r} have different architectures: {what}"
            )


def _name_templates(names: list[str]) -> set[str]:
    return {_LAYER_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}.N.", n, count=1) for n in names}


def reference_parts(reference: str, *, base_dir: Path = Path(".")) -> list[str]:
    """The folders a model reference names: itself, or a base and a LoRA adapter for mergekit's
    `base+adapter` (a folder whose own name holds a `+` stays one reference)."""
    if "+" not in reference or (base_dir / reference).expanduser().is_dir():
        return [reference]
    return reference.split("+")


def resolve_model_path(reference: str) -> Path:
    """A local folder for a model reference: a path as is, or a hub id downloaded if possible."""
    path = Path(reference).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"model {reference!r} is a file; expected a model folder")
    if reference.startswith((".", "/", "~")) or reference.count("/") != 1:
        raise UserError(f"model folder {reference!r} does not exist")
    return _download(reference)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # the hub raises many types; all mean "not available here"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = (
            "the hub is offline (HF_HUB_OFFLINE=1)"
            if offline
            else f"unreachable or unknown there: {type(exc).__name__}"
        )
        raise UserError(
            f"model {repo_id!r} is not a local folder and could not be fetched from the "
            f"Hugging Face hub ({why})"
        ) from None


def _tensor_files(folder: Path, *, allow_pickle: bool) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{index} is not a valid safetensors index: {exc}") from None
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise UserError(f"{folder}: shards listed in the index are missing: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = [
        f
        for f in sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
        if f.name not in _NOT_WEIGHTS
    ]
    if pickles:
        if not allow_pickle:
            raise UserError(
                f"{folder} holds only pickle weights (.bin/.pt), which can run code when "
                "loaded; convert them to safetensors or pass --allow-pickle"
            )
        return pickles
    raise UserError(f"{folder} contains no .safetensors weights")


# Pickles a training run leaves beside its weights: never model weights, never loaded.
_NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"}


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """A pickle state dict, read with `weights_only=True`: plain tensors and containers only,
    never arbitrary objects, so a malicious file is refused instead of run."""
    import pickle

    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"{file} holds more than plain weights (pickled objects that could run code); refused"
        ) from None
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
    ) as exc:  # truncated, old format, not a pickle
        raise UserError(f"cannot read pickle weights {file}: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{file} is not a state dict of tensors")
    return state


_DTYPE_CODES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def _dtype_code(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    return _DTYPE_CODES.get(name, name.upper())


def _read_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtypes from a safetensors header, checked before any mmap."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise UserError(f"{file} is truncated: no safetensors header")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise UserError(
                f"{file} claims a {header_len}-byte header in a {size}-byte file; "
                "it is corrupt or not a safetensors file"
            )
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{file} has an unreadable safetensors header") from None
    if not isinstance(header, dict):
        raise UserError(f"{file} has an unreadable safetensors header")
    out = {}
    data_bytes = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            shape, dtype = tuple(int(d) for d in info["shape"]), str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{file}: malformed header entry for {name!r}") from None
        if not 0 <= start <= end <= data_bytes:
            raise UserError(f"{file} is truncated or corrupt: tensor {name!r} lies past its end")
        if dtype in _ITEMSIZE and end - start != _ITEMSIZE[dtype] * math.prod(shape):
            raise UserError(
                f"{file} is corrupt: tensor {name!r} has {end - start} bytes for shape {list(shape)}"
            )
        out[name] = (shape, dtype)
    return out
