"""Reproducible random numbers for DARE and DELLA masks.

A mask must be a pure function of (seed, tensor name, model index, element index), so that a
recipe gives the same model bit for bit whatever the order of work, the thread count or the
device. `UniformField` hashes those four numbers with a counter-based integer hash (no RNG
state at all) into 24-bit integers; an element is kept with probability p when its integer is
below p * 2**24, p rounded up to a multiple of 2**-16 (`keep_threshold`). Everything is exact
integer arithmetic in int64, which every torch device computes identically.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

BITS = 24
SCALE = 1 << BITS
# Keep probabilities are multiples of 1 / STEPS: then what a DARE mask keeps, summed over the
# draws' top 16 bits, is a table of STEPS + 1 numbers per tensor that answers every density
# (`draw_l1_table`), and the search needs no pass over memory for DARE's L1 rescale.
STEP_BITS = 16
STEPS = 1 << STEP_BITS
_CHUNK = 1 << 22  # elements hashed at once (a power of two, so a chunk never spans 2**32)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """In place: the "lowbias32" avalanche hash on int32 (two's-complement wrapping multiply).

    `>>` on int32 is arithmetic, so each shift is masked to make it logical.
    """
    x ^= (x >> 16) & 0xFFFF
    x *= 0x7FEB352D
    x ^= (x >> 15) & 0x1FFFF
    x *= 0x846CA68B - (1 << 32)  # the same 32 bits, as a signed int32 constant
    x ^= (x >> 16) & 0xFFFF
    return x


def _mix32_int(x: int) -> int:
    """The same hash on a Python int, for per-chunk constants."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _as_int32(x: int) -> int:
    return x - (1 << 32) if x >= 1 << 31 else x


@dataclass(frozen=True)
class UniformField:
    """Random 24-bit integers for every element of one tensor, per model.

    `seed` is the recipe's seed; `tensor_name` the output tensor's name.
    """

    seed: int
    tensor_name: str

    def _keys(self, model_index: int) -> tuple[int, int]:
        text = f"{self.seed}\x00{self.tensor_name}\x00{model_index}".encode()
        digest = hashlib.blake2b(text, digest_size=8).digest()
        return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")

    def hash_key(self, model_index: int, high: int = 0) -> int:
        """The key of elements high * 2**32 + low: their draw is mix32(low-offset + key)."""
        key_lo, key_hi = self._keys(model_index)
        return key_lo ^ _mix32_int(high ^ key_hi)

    def integers(self, model_index: int, shape: torch.Size, device="cpu") -> torch.Tensor:
        """int32 values uniform on [0, 2**24), shaped like the tensor."""
        return self.span(model_index, 0, shape.numel(), device).view(shape)

    def span(self, model_index: int, start: int, stop: int, device="cpu") -> torch.Tensor:
        """The int32 values of elements start..stop-1 (flat indices)."""
        out = torch.empty(stop - start, dtype=torch.int32, device=device)
        at = start
        while at < stop:
            chunk = at - at % _CHUNK
            end = min(chunk + _CHUNK, stop)
            # element index = high * 2**32 + low; the high part keys the whole chunk
            key = _as_int32(self.hash_key(model_index, chunk >> 32) ^ (chunk & 0xFFFFFFFF))
            h = torch.arange(at - chunk, end - chunk, dtype=torch.int32, device=device)
            h += key  # wraps: equals (low index + key) mod 2**32 bit for bit
            _mix32(h)
            out[at - start : end - start] = (h >> (32 - BITS)) & (SCALE - 1)
            at = end
        return out

    def bernoulli(self, model_index: int, p: float, shape: torch.Size, device="cpu") -> torch.Tensor:
        """A boolean mask, True with probability p (exactly keep_threshold(p) / 2**24)."""
        return self.integers(model_index, shape, device) < keep_threshold(p)


def keep_threshold(p: float) -> int:
    """The integer below which a 24-bit draw counts as kept with probability p: p rounded up
    to a multiple of 1 / STEPS (a density step of 1.5e-5), times 2**24."""
    import math

    return min(STEPS, max(0, math.ceil(p * STEPS))) << (BITS - STEP_BITS)
