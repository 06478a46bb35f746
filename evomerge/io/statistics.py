"""Per-model input statistics on disk: what a data-aware merge method (RegMean) reads.

One safetensors file per model, one float32 tensor per weight it covers, keyed by the weight's
name in that model (`model.layers.0.self_attn.q_proj.weight`): for a linear layer's (out, in)
weight, the (in, in) Gram matrix X^T X / N of the inputs it saw; for an embedding's (rows,
width) matrix, the diagonal of its Gram matrix over one-hot inputs, i.e. each row's (token's)
frequency, (rows,). A recipe names the files in its `statistics`
mapping (model reference -> file); `evomerge.fitness.statistics` writes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.errors import UserError

if TYPE_CHECKING:
    import torch


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
        self._open: dict[str, object] = {}

    def check(self, model: str, name: str, shape: tuple[int, ...]) -> bool:
        """Whether model `model` has statistics for weight `name` of `shape`, from the file's
        header alone; a UserError for a missing model or statistics of the wrong shape."""
        handle = self._handle(model)
        if name not in handle.keys() or len(shape) != 2:
            return False
        header = handle.get_slice(name)
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

        gram = self._handle(model).get_tensor(name)
        if not torch.isfinite(gram).all():
            raise UserError(f"the statistics of {model!r} for {name!r} hold NaN or Inf values")
        return gram.to(torch.float32)

    def _handle(self, model: str):
        from safetensors import SafetensorError, safe_open

        if model not in self.files:
            raise UserError(
                f"the recipe's statistics name no file for model {model!r} "
                f"(they name: {', '.join(sorted(self.files)) or 'none'})"
            )
        if model not in self._open:
            try:
                self._open[model] = safe_open(str(self.files[model]), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise UserError(
                    f"the statistics file of {model!r} ({self.files[model]}) cannot be read: {exc}"
                ) from None
        return self._open[model]
