"""Per-model input statistics on disk: what a data-aware merge method (RegMean) reads.

One safetensors file per model, written by `evomerge.fitness.statistics` (`pack`) and named by
a recipe's `statistics` mapping (model reference -> file). For a linear layer's (out, in)
weight, the statistics are the (in, in) Gram matrix G = X^T X / N of the inputs it saw; for an
embedding's (rows, width) matrix, the diagonal of its Gram matrix over one-hot inputs, i.e.
each row's (token's) frequency, (rows,) float32, over the model's own rows even where a
recipe aligns vocabularies (the merge lays them out by token as it lays out the rows,
`VocabularyAlignment.align_statistics`). Two layouts are read:

    version 2 (metadata format: evomerge.statistics, version: 2; what evomerge writes)
        each distinct input once: q/k/v_proj read one tensor, gate/up_proj another, so the
        matrix is stored under the first weight that reads it and the metadata's `same_input`
        (JSON: weight -> stored weight) names it for the others. A matrix is stored as its
        correlation C = D^-1/2 G D^-1/2 in float16 (entries in [-1, 1], so no activation is
        too large for float16's range) under the weight's name, with the float32 scales
        sqrt(diag G) under `<name>:scale`: G = C * s s^T.
    version 1 (no metadata; files of earlier runs)
        one float32 tensor per weight, keyed by its name (G itself). Still read as written:
        a resumed run keeps the statistics its earlier trials merged with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.errors import UserError

if TYPE_CHECKING:
    import torch

FORMAT = "evomerge.statistics"
VERSION = "2"
SCALE = ":scale"
"""The suffix of a stored matrix's scales, sqrt(diag G), in a version-2 file."""


def pack(
    statistics: dict[str, torch.Tensor], same_input: dict[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a version-2 file: `statistics` (weight -> float Gram matrix
    (in, in) or row vector (rows,), one per distinct input) and `same_input` (weight -> the
    weight in `statistics` whose input it reads)."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    for name, gram in statistics.items():
        if gram.dim() == 1:
            tensors[name] = gram.to(torch.float32).contiguous()
            continue
        gram = gram.to(torch.float32)
        scale = torch.diagonal(gram).clamp_min(0).sqrt()  # (in,)
        inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
        # |G_ij| <= sqrt(G_ii G_jj): the correlation lies in [-1, 1] but for rounding
        correlation = (gram * inverse[:, None] * inverse[None, :]).clamp_(-1, 1)  # (in, in)
        tensors[name] = correlation.to(torch.float16)
        tensors[name + SCALE] = scale
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "same_input": json.dumps(same_input, sort_keys=True),
    }
    return tensors, metadata


class InputStatistics:
    """The statistics files of a recipe, opened lazily; `gram(model, name)` reads one."""

    def __init__(self, files: dict[str, str]):
        self.files = {model: Path(path) for model, path in files.items()}
        for model, path in self.files.items():
            if not path.is_file():
                raise UserError(f"the statistics file of {model!r} ({path}) does not exist")
            if path.suffix != ".safetensors":
                raise UserError(
                    f"the statistics file of {model!r} ({path}) must be a .safetensors file"
                )
        self._open: dict[str, tuple[object, dict[str, str]]] = {}

    def check(self, model: str, name: str, shape: tuple[int, ...]) -> bool:
        """Whether model `model` has statistics for weight `name` of `shape`, from the file's
        header alone; a UserError for a missing model or statistics of the wrong shape."""
        handle, same_input = self._handle(model)
        key = same_input.get(name, name)
        if key not in handle.keys() or len(shape) != 2:
            return False
        header = handle.get_slice(key)
        got, dtype = tuple(header.get_shape()), header.get_dtype()
        rows, width = shape
        if got not in ((width, width), (rows,)) or dtype not in ("F64", "F32", "F16", "BF16"):
            raise UserError(
                f"the statistics of {model!r} for {name!r} must be a ({width}, {width}) float "
                f"matrix (the weight's input width) or ({rows},) per row, got {got} {dtype}"
            )
        return True

    def gram(self, model: str, name: str) -> torch.Tensor:
        """Model `model`'s statistics for weight `name` (checked by `check`), as float32; a
        UserError where they are not finite."""
        import torch

        handle, same_input = self._handle(model)
        key = same_input.get(name, name)
        gram = handle.get_tensor(key).to(torch.float32)
        if key + SCALE in handle.keys():  # a version-2 matrix: G = C * s s^T
            scale = handle.get_tensor(key + SCALE).to(torch.float32)
            gram.mul_(scale[:, None]).mul_(scale[None, :])
        if not torch.isfinite(gram).all():
            raise UserError(f"the statistics of {model!r} for {name!r} hold NaN or Inf values")
        return gram

    def _handle(self, model: str):
        """The open file of `model` and its `same_input` map (empty for a version-1 file)."""
        from safetensors import SafetensorError, safe_open

        if model not in self.files:
            raise UserError(
                f"the recipe's statistics name no file for model {model!r} "
                f"(they name: {', '.join(sorted(self.files)) or 'none'})"
            )
        if model not in self._open:
            path = self.files[model]
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise UserError(
                    f"the statistics file of {model!r} ({path}) cannot be read: {exc}"
                ) from None
            metadata = handle.metadata() or {}
            same_input: dict[str, str] = {}
            if metadata.get("format") == FORMAT:
                if metadata.get("version") != VERSION:
                    raise UserError(
                        f"the statistics file of {model!r} ({path}) is of version "
                        f"{metadata.get('version')!r}, which this evomerge cannot read (it reads "
                        f"{VERSION} and files without a version); delete it and `evomerge "
                        "search` collects it again"
                    )
                same_input = json.loads(metadata.get("same_input") or "{}")
            self._open[model] = (handle, same_input)
        return self._open[model]
