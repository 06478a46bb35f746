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
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.errors import UserError
from evomerge.io.dtypes import ITEMSIZE, NAMES, code_of, torch_dtype

if TYPE_CHECKING:
    import torch

LOG = logging.getLogger(__name__)

# `model.layers.12.mlp...`, `transformer.h.3.attn...`, `blocks.0...`
_LAYER_RE = re.compile(r"(^|\.)(layers|h|blocks|block|layer)\.(\d+)\.")

# The config keys that hold the layer count, by architecture family: `num_hidden_layers`
# (Llama, Mistral, Qwen, Gemma, Phi, GPT-NeoX, Falcon, ...), `n_layer` (GPT-2, GPT-J, Bloom,
# CodeGen), `num_layers` (GPT-Neo, ChatGLM, T5), `n_layers` (MPT, DBRX). A merge that changes
# the depth must rewrite whichever the config has, or transformers builds the old depth and
# silently ignores the extra layers' tensors.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

# Above this a header is not a real safetensors header but an attack or a corrupt file.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


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
        for name in METADATA_FILES:
            if (self.path / name).exists() or (self.path / name).is_symlink():
                inside(self.path, name)
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
                    n: (tuple(t.shape), code_of(t.dtype)) for n, t in self._handles[file].items()
                }
            for name, (shape, dtype) in header.items():
                _check_dtype(file, name, dtype)
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
        return torch_dtype(NAMES[self.dtype_name(name)])

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
        return read_json_object(inside(self.path, file.name))

    @cached_property
    def num_layers(self) -> int:
        """Transformer layers: from the config, else from the tensor names."""
        configured = next((self.config[k] for k in LAYER_COUNT_KEYS if k in self.config), None)
        if configured:
            # a bool is an int to Python, and "two" or 2.5 would fail deep inside the plan
            if isinstance(configured, bool) or not isinstance(configured, int) or configured < 0:
                raise UserError(
                    f"{self.path / 'config.json'}: the layer count must be a whole number, "
                    f"got {configured!r}; fix the model's config.json"
                )
            return configured
        indices = [i for i in map(layer_index, self.names) if i is not None]
        return max(indices) + 1 if indices else 0

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self._files)


def check_compatible(checkpoints: dict[str, Checkpoint], *, same_vocabulary: bool = True) -> None:
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
        if same_vocabulary and a is not None and b is not None and a != b:
            raise UserError(
                f"models {first_ref!r} ({a} tokens) and {ref!r} ({b} tokens) have different "
                "vocabularies; add 'tokenizer_source: union' (or base, or a model) to align "
                "them token by token"
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


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
# Every file evomerge may read from a model folder besides its weights (and copy into a merged
# model): each is checked to stay inside the folder when the folder is opened, before any work.
METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    *TOKENIZER_FILES,
)


def inside(folder: Path, name: str | Path) -> Path:
    """`folder / name`, refused (`UserError`) when it resolves outside `folder`.

    Whatever evomerge reads from a model folder (weights, index shards, configs, tokenizer
    files) may be copied into a merged model that its user then publishes, so a symlink or a
    `..` must never reach a file the user did not name (a token cache, a key). The folder
    itself may be a symlink: containment is judged after resolving it."""
    path = Path(folder) / name
    root, target = Path(folder).resolve(), path.resolve()
    if target != root and root not in target.parents:
        raise UserError(
            f"{path} resolves outside its model folder {folder} (a symlink or '..'); "
            "evomerge reads nothing from outside the folder named: copy the file into it"
        )
    return path


def read_json(file: Path) -> object:
    """The JSON value in `file`, or one sentence (`UserError`) saying why it cannot be read:
    a folder, unreadable, not UTF-8, not JSON, or nested too deep for the parser."""
    try:
        return json.loads(Path(file).read_bytes())
    except OSError as exc:
        why = exc.strerror or str(exc)
    except UnicodeDecodeError:
        why = "not UTF-8 text"
    except json.JSONDecodeError as exc:
        why = f"not valid JSON: {exc}"
    except RecursionError:  # `[[[[...` 100 000 deep: an attack or a corrupt file
        why = "nested too deep to be a real file"
    raise UserError(f"cannot read {file} ({why}); fix or replace the file")


def read_json_object(file: Path) -> dict:
    """`read_json`, refused unless the file holds a JSON object (a mapping of settings)."""
    value = read_json(file)
    if not isinstance(value, dict):
        raise UserError(
            f"{file} holds a JSON {type(value).__name__}, not an object of settings; "
            "fix or replace the file"
        )
    return value


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
        weight_map = read_json_object(inside(folder, index.name)).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index} is not a valid safetensors index: it has no weight_map")
        if not all(isinstance(name, str) for name in weight_map.values()):
            raise UserError(
                f"{index} is not a valid safetensors index: shard names must be strings"
            )
        files = sorted({inside(folder, name) for name in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise UserError(f"{folder}: shards listed in the index are missing: {missing}")
        return files
    files = sorted(inside(folder, f.name) for f in folder.glob("*.safetensors"))
    if files:
        return files
    pickles = [
        f
        for f in sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
        if f.name not in _NOT_WEIGHTS
    ]
    if pickles:
        pickles = [inside(folder, f.name) for f in pickles]
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
    ):  # truncated, old format, not a pickle: torch's own text advises unsafe retries
        raise UserError(
            f"cannot read pickle weights {file}: not a complete PyTorch weights file "
            "(truncated, corrupt or an old format); convert it to safetensors"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{file} is not a state dict of tensors")
    return state


def _check_dtype(file: Path, name: str, dtype: str) -> None:
    """Refuse a tensor type the merge arithmetic does not handle (FP8, FP4, ...) up front,
    instead of failing at the tensor deep inside a merge."""
    if dtype not in ITEMSIZE:
        raise UserError(
            f"{file}: tensor {name!r} has dtype {dtype}, which evomerge cannot merge "
            f"(it reads {', '.join(ITEMSIZE)}); convert the model first, e.g. to bfloat16"
        )


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
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
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
        _check_dtype(file, name, dtype)
        if not 0 <= start <= end <= data_bytes:
            raise UserError(f"{file} is truncated or corrupt: tensor {name!r} lies past its end")
        if dtype in ITEMSIZE and end - start != ITEMSIZE[dtype] * math.prod(shape):
            raise UserError(
                f"{file} is corrupt: tensor {name!r} has {end - start} bytes "
                f"for shape {list(shape)}"
            )
        out[name] = (shape, dtype)
    return out
