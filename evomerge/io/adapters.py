"""PEFT LoRA adapters as models: `base+adapter` references, as in mergekit recipes.

A LoRA adapter (a folder with `adapter_config.json` and `adapter_model.safetensors`) stores, for
each adapted linear layer W of shape (out, in), two factors A (r, in) and B (out, r). The model
it stands for is

    W' = W + s * B @ A,    s = alpha / r    (alpha / sqrt(r) with rank-stabilised LoRA)

(transposed for layers stored as (in, out), `fan_in_fan_out`). An `AdapterCheckpoint` is the
base checkpoint with that sum applied per tensor as it is read: only the factors stay in memory,
and the numbers are those of PEFT's `merge_and_unload`, which mergekit 0.1.5 runs for the same
reference (the product in the factors' float32, then added in place to the base tensor).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.errors import UserError
from evomerge.io.checkpoint import (
    Checkpoint,
    _load_pickle,
    inside,
    read_json_object,
    reference_parts,
    resolve_model_path,
)
from evomerge.io.fingerprint import folder_fingerprint

if TYPE_CHECKING:
    import torch

# base_model.model.<module>.lora_A[.<adapter name>].weight ; embeddings: lora_embedding_A[.<name>]
_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(\.[A-Za-z0-9_-]+?)?(\.weight)?$"
)


def open_checkpoint(reference: str, *, allow_pickle: bool = False) -> Checkpoint:
    """A model reference as recipes write it: a folder, or `base+adapter` (mergekit's syntax)."""
    parts = reference_parts(reference)
    if len(parts) == 1:
        return Checkpoint(reference, allow_pickle=allow_pickle)
    if len(parts) != 2 or not all(parts):
        raise UserError(f"model reference {reference!r} must be a folder or BASE+ADAPTER")
    return AdapterCheckpoint(parts[0], parts[1], allow_pickle=allow_pickle)


@dataclass(frozen=True)
class LoraFactors:
    """The low-rank update of one base tensor: delta = scale * B @ A (transposed if asked)."""

    a: torch.Tensor  # (r, in); for embeddings (r, vocab)
    b: torch.Tensor  # (out, r); for embeddings (dim, r)
    scale: float
    transpose: bool  # fan_in_fan_out layers and embeddings store the product transposed
    embedding: bool

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """W + delta, rounded as PEFT's merge rounds: a linear layer adds the float32 delta in
        place (one rounding, to W's dtype); an embedding rounds the delta to W's dtype first."""
        product = self.b @ self.a  # float32
        delta = (product.T if self.transpose else product).mul_(self.scale)
        if self.embedding:
            return weight + delta.to(weight.dtype)
        # PEFT adds in place (W += delta): the sum in the wider type, rounded once to W's dtype.
        if weight.element_size() > delta.element_size():
            return weight + delta
        return delta.add_(weight).to(weight.dtype)


class AdapterCheckpoint(Checkpoint):
    """The base model with a LoRA adapter applied to each tensor it adapts, on read."""

    def __init__(self, base: str, adapter: str, *, allow_pickle: bool = False):
        super().__init__(base, allow_pickle=allow_pickle)
        self.reference = f"{base}+{adapter}"
        self.adapter_path = resolve_model_path(adapter)
        config = _adapter_config(self.adapter_path)
        self._check_base(config, base)
        self.factors = _load_factors(self.adapter_path, config, self, allow_pickle=allow_pickle)

    def __repr__(self) -> str:
        return f"AdapterCheckpoint({self.reference!r})"

    def tensor(self, name: str) -> torch.Tensor:
        weight = self.base_tensor(name)
        factors = self.factors.get(name)
        return weight if factors is None else factors.apply(weight)

    def base_tensor(self, name: str) -> torch.Tensor:
        """The base model's tensor `name`, before the adapter is applied."""
        return super().tensor(name)

    def _check_base(self, config: dict, base: str) -> None:
        """The adapter's recorded base, where it names a local folder, must be this base."""
        named = config.get("base_model_name_or_path")
        if not named:
            return
        folder = Path(named).expanduser()
        if folder.is_dir() and folder.resolve() != self.path.resolve():
            # the weights decide: a copy with a re-saved config is still the same base
            recorded = folder_fingerprint(folder, weights_only=True)
            if recorded != folder_fingerprint(self.path, weights_only=True):
                raise UserError(
                    f"adapter {str(self.adapter_path)!r} was trained on {named!r}, "
                    f"which is not the base {base!r} it is applied to"
                )


def _adapter_config(folder: Path) -> dict:
    file = folder / "adapter_config.json"
    if not file.is_file():
        raise UserError(
            f"{str(folder)!r} is not a PEFT adapter folder: it has no adapter_config.json"
        )
    config = read_json_object(inside(folder, file.name))
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise UserError(
            f"adapter {str(folder)!r} is a {config['peft_type']} adapter; "
            "only LoRA adapters can be merged"
        )
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA bias terms")):
        if config.get(flag):
            raise UserError(f"adapter {str(folder)!r} uses {what}, which evomerge cannot merge yet")
    _check_ranks(file, config)
    return config


def _check_ranks(file: Path, config: dict) -> None:
    """`r`, `lora_alpha` and their per-module patterns must be positive numbers: they divide
    every update (a rank of 0, or an alpha of "x", would fail mid-merge)."""
    for key, default in (("r", 8), ("lora_alpha", 8)):
        _check_positive(file, key, config.get(key, default))
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise UserError(f"{file}: {key} must map module patterns to numbers; fix the file")
        for pattern, value in patterns.items():
            _check_positive(file, f"{key}[{pattern!r}]", value)


def _check_positive(file: Path, key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UserError(f"{file}: {key} must be a positive number, got {value!r}; fix the file")


def _scale(config: dict, module: str) -> float:
    """alpha / r for this module, with PEFT's per-module rank and alpha patterns."""
    rank = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: the first pattern whose regex matches the end of the module's name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _adapter_tensors(folder: Path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = folder / "adapter_model.safetensors"
    if file.is_file():
        try:
            return load_file(str(inside(folder, file.name)))
        except (SafetensorError, OSError) as exc:  # truncated, corrupt, unreadable
            raise UserError(f"cannot read adapter weights {file}: {exc}") from None
    pickled = folder / "adapter_model.bin"
    if pickled.is_file():
        inside(folder, pickled.name)
        if not allow_pickle:
            raise UserError(
                f"adapter {str(folder)!r} has only a pickle file (adapter_model.bin), "
                "which can run code when loaded; convert it to safetensors, "
                "or pass --allow-pickle to load it weights-only"
            )
        # weights only, and refused in one sentence if it is anything else
        return _load_pickle(pickled)
    raise UserError(f"adapter {str(folder)!r} has no adapter_model.safetensors")


def _load_factors(
    folder: Path, config: dict, base: Checkpoint, *, allow_pickle: bool
) -> dict[str, LoraFactors]:
    """{base tensor name: its factors}, each checked against the base tensor's shape."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    embeddings: set[str] = set()
    for key, value in _adapter_tensors(folder, allow_pickle=allow_pickle).items():
        match = _KEY.match(key)
        if match is None:
            raise UserError(
                f"adapter {str(folder)!r} holds tensor {key!r}, which is not a LoRA factor "
                "(modules_to_save and other extras are not supported)"
            )
        module, part = match["module"], match["part"]
        if "embedding" in part:
            embeddings.add(module)
        parts.setdefault(module, {})[part[-1]] = value.float()  # PEFT casts adapters to float32
    factors = {}
    for module, pair in parts.items():
        name = f"{module}.weight"
        if name not in base:
            raise UserError(
                f"adapter {str(folder)!r} targets {module!r}, which the base model lacks"
            )
        if set(pair) != {"A", "B"}:
            raise UserError(
                f"adapter {str(folder)!r} has only lora_{next(iter(pair))} for {module!r}"
            )
        rank = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
        if pair["A"].dim() == 2 and pair["A"].shape[0] != rank:  # PEFT refuses it too
            raise UserError(
                f"adapter {str(folder)!r} has rank {pair['A'].shape[0]} factors for {module!r}, "
                f"but its adapter_config.json says r={rank}; fix r (or rank_pattern)"
            )
        # Embeddings store (r, vocab) and (dim, r): their product is the transposed update.
        embedding = module in embeddings
        transpose = embedding or bool(config.get("fan_in_fan_out"))
        a, b = pair["A"], pair["B"]
        shape = (a.shape[-1], b.shape[0]) if transpose else (b.shape[0], a.shape[-1])
        if (
            a.dim() != 2
            or b.dim() != 2
            or a.shape[0] != b.shape[1]
            or shape != tuple(base.shape(name))
        ):
            raise UserError(
                f"adapter {str(folder)!r} does not fit the base: its update of "
                f"{module!r} has shape {shape}, the base tensor {tuple(base.shape(name))}"
            )
        factors[name] = LoraFactors(a, b, _scale(config, module), transpose, embedding)
    return factors
