"""Reproducible random numbers for DARE and DELLA masks.

A mask must be a pure function of (seed, tensor name, model index, element index), so that a
recipe gives the same model bit for bit whatever the order of work, the thread count or the
device. `UniformField` hashes those four numbers with a counter-based integer hash (no RNG
state at all) into 16-bit integers, two per hash: elements 2k and 2k + 1 take the low and
high halves of the hash of k (the hash is a bijection of 32-bit integers, so the halves are
as independent as two separate draws, and a draw costs half a hash). An element is kept with
probability p when its integer is below p * 2**16, p rounded up to a multiple of 2**-16
(`keep_threshold`). Everything is exact integer arithmetic in int32/int64, which every torch
device computes identically.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

BITS = 16
# Keep probabilities are multiples of 1 / SCALE, the draws' own step: then what a DARE mask
# keeps, summed by draw, is a table of SCALE + 1 numbers per tensor that answers every density
# (`draw_l1_table`), and the search needs no pass over memory for DARE's L1 rescale.
SCALE = 1 << BITS
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
    """Random 16-bit integers for every element of one tensor, per model.

    `seed` is the recipe's seed; `tensor_name` the output tensor's name.
    """

    seed: int
    tensor_name: str

    def _keys(self, model_index: int) -> tuple[int, int]:
        text = f"{self.seed}\x00{self.tensor_name}\x00{model_index}".encode()
        digest = hashlib.blake2b(text, digest_size=8).digest()
        return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")

    def hash_key(self, model_index: int, high: int = 0) -> int:
        """The key of elements high * 2**32 + low: a chunk's elements 2k and 2k + 1 draw the
        low and high halves of mix32(k + (key ^ chunk start))."""
        key_lo, key_hi = self._keys(model_index)
        return key_lo ^ _mix32_int(high ^ key_hi)

    def integers(self, model_index: int, shape: torch.Size, device="cpu") -> torch.Tensor:
        """int32 values uniform on [0, 2**16), shaped like the tensor."""
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
            first, last = at - chunk, end - chunk  # element offsets in the chunk
            h = torch.arange(first >> 1, (last + 1) >> 1, dtype=torch.int32, device=device)
            h += key  # wraps: equals (pair index + key) mod 2**32 bit for bit
            _mix32(h)
            halves = torch.stack((h & 0xFFFF, (h >> 16) & 0xFFFF), dim=1).flatten()
            out[at - start : end - start] = halves[first & 1 : (first & 1) + end - at]
            at = end
        return out

    def bernoulli(
        self, model_index: int, p: float, shape: torch.Size, device="cpu"
    ) -> torch.Tensor:
        """A boolean mask, True with probability p (exactly keep_threshold(p) / 2**16)."""
        return self.integers(model_index, shape, device) < keep_threshold(p)


def keep_threshold(p: float) -> int:
    """The integer below which a 16-bit draw counts as kept with probability p: p rounded up
    to a multiple of 1 / SCALE (a density step of 1.5e-5), times SCALE."""
    import math

    return min(SCALE, max(0, math.ceil(p * SCALE)))
