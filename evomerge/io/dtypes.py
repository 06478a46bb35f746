"""Tensor dtypes, in one table: the name torch and recipes use (`bfloat16`), the code a
safetensors header stores (`BF16`) and the bytes per element.

Torch is imported only when a torch dtype is asked for, so that reading headers and checking
recipes stays light.
"""

from __future__ import annotations

from functools import lru_cache

# torch name -> (safetensors code, bytes per element): every dtype a checkpoint may hold
_TABLE = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
}
CODES = {name: code for name, (code, _) in _TABLE.items()}  # "bfloat16" -> "BF16"
NAMES = {code: name for name, code in CODES.items()}  # "BF16" -> "bfloat16"
ITEMSIZE = dict(_TABLE.values())  # "BF16" -> 2

# What a merge may compute and write in: a recipe's `dtype` and `out_dtype`, a pool's dtype.
MERGE_DTYPES = ("float32", "float16", "bfloat16", "float64")


def name_of(dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"` (as recipes, vLLM and this table name it)."""
    return str(dtype).removeprefix("torch.")


def code_of(dtype) -> str:
    """The safetensors code of a torch dtype; one outside the table keeps its name, upper-cased
    (so that a header check can name it)."""
    name = name_of(dtype)
    return CODES.get(name, name.upper())


@lru_cache(maxsize=1)
def _torch_dtypes() -> dict:
    import torch

    return {name: getattr(torch, name) for name in _TABLE}


def torch_dtype(name: str | None):
    """The torch dtype of a table name (`"bfloat16"` -> `torch.bfloat16`); None stays None."""
    return None if name is None else _torch_dtypes()[name]
