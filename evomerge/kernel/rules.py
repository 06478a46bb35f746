"""What the kernels read for each model: its task vector and which of its elements survive.

Plain data shared by the C kernel (`cpu.py`) and the Triton kernel (`triton_merge.py`); the
`KeepRule` layout is the `keep_rule` struct of tv_merge.c.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import torch


class TaskVector(NamedTuple):
    """tau = x - base as the kernel reads it: a stored task vector (base None), or a model and
    the base, subtracted on the fly (a one-shot merge then never stores tau at all)."""

    x: torch.Tensor
    base: torch.Tensor | None = None

    def pointers(self) -> tuple[int, int | None]:
        return self.x.data_ptr(), self.base.data_ptr() if self.base is not None else None


class KeepRule(ctypes.Structure):
    """Which elements of one model's task vector survive (see tv_merge.c). Rules that point
    into a tensor (ranks, stored bits) hold it as `tensor`, which keeps the pointer valid."""

    _fields_ = [
        ("mode", ctypes.c_int32),
        ("threshold", ctypes.c_int32),
        ("key", ctypes.c_void_p),
        ("hash_key", ctypes.c_uint32),
        ("cut_bits", ctypes.c_uint32),
        ("cutoff", ctypes.c_int64),
        ("bits", ctypes.c_void_p),
    ]
    # the modes, as tv_merge.c names them
    KEEP_ALL, KEY_BELOW, HASH_BELOW, MAGNITUDE, BITS = range(5)

    @classmethod
    def keep_all(cls) -> KeepRule:
        return cls(mode=cls.KEEP_ALL)

    @property
    def keeps_all(self) -> bool:
        return self.mode == self.KEEP_ALL

    @classmethod
    def key_below(cls, key: torch.Tensor, threshold: int) -> KeepRule:
        """key[e] < threshold, e.g. precomputed magnitude ranks (int32): the C kernel's, for
        small resident tensors; the Triton kernel takes `magnitude_cut` instead."""
        rule = cls(mode=cls.KEY_BELOW, threshold=threshold, key=key.data_ptr())
        rule.tensor = key
        return rule

    @classmethod
    def hash_below(cls, hash_key: int, threshold: int) -> KeepRule:
        """The DARE draw of each element (random_fields.UniformField) < threshold (at most
        random_fields.SCALE, as keep_threshold gives it)."""
        return cls(mode=cls.HASH_BELOW, threshold=threshold, hash_key=hash_key)

    @classmethod
    def stored_bits(cls, bits: torch.Tensor) -> KeepRule:
        """Element e kept where bit e % 8 of bits[e // 8] is set (cpu.abs_sums stores them)."""
        rule = cls(mode=cls.BITS, bits=bits.data_ptr())
        rule.tensor = bits
        return rule

    @classmethod
    def magnitude_cut(cls, cut_bits: int, cutoff: int) -> KeepRule:
        """|tau| above the cut (float32 bits), or at it and below index `cutoff`
        (cpu.top_magnitudes, triton_merge.top_magnitudes)."""
        return cls(mode=cls.MAGNITUDE, cut_bits=cut_bits, cutoff=cutoff)
