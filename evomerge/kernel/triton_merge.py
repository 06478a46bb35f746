"""The task-vector merge kernel for CUDA GPUs, in Triton.

The same computation as tv_merge.c, op for op, so a candidate merged on a GPU has the bits of
`evomerge merge` on the CPU:
  - float32 arithmetic, each op's result rounded to the storage type (bfloat16/float16) by
    integer bit operations: round-to-nearest-even, identical on every GPU and in Triton's CPU
    interpreter (which the tests run; its float-to-bfloat16 cast truncates);
  - sums over models left to right; IEEE division (div_rn); no fused multiply-adds
    (enable_fp_fusion=False);
  - DARE's draws hashed in the kernel as random_fields.py draws them; L1 sums exact in int64.

Keep rules per model: 0 keep all, 1 a magnitude rank below the threshold (TIES; there is no
GPU radix select, so ranks are computed by torch first), 2 the DARE draw below the threshold.

Nothing here runs until task_vectors.gpu_ready has compared it with the CPU on the GPU at
hand. The tests run it in Triton's CPU interpreter
(tests/test_kernel_triton.py); no GPU was available to measure it on yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evomerge.kernel.rules import KeepRule

BLOCK = 1024
_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_LAUNCH = dict(enable_fp_fusion=False)  # a fused multiply-add would round differently


@triton.jit
def _mix32(x):
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _round(x, KIND: tl.constexpr):
    """x rounded to the storage type (0 float32, 1 bfloat16, 2 float16), kept as float32."""
    if KIND == 0:
        r = x
    else:
        u = x.to(tl.uint32, bitcast=True)
        sign = u & 0x80000000
        a = u ^ sign
        if KIND == 1:
            rounded = (a + 0x7FFF + ((a >> 16) & 1)) & 0xFFFF0000
        else:
            normal = (a + 0xFFF + ((a >> 13) & 1)) & 0xFFFFE000
            subnormal = ((a.to(tl.float32, bitcast=True) + 0.5) - 0.5).to(tl.uint32, bitcast=True)
            rounded = tl.where(a < (113 << 23), subnormal, normal)
            rounded = tl.where((rounded > 0x477FE000) & (a <= 0x7F800000), 0x7F800000, rounded)
        r = tl.where(x == x, (rounded | sign).to(tl.float32, bitcast=True), x)  # NaN stays NaN
    return r


@triton.jit
def _task_vector(x_ptr, sub_base_ptr, offs, mask, KIND: tl.constexpr, HAS_SUB: tl.constexpr):
    """tau at offs: x - base rounded (a one-shot merge), or x itself (a stored task vector)."""
    d = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.float32)
    if HAS_SUB:
        d = _round(d - tl.load(sub_base_ptr + offs, mask=mask, other=0).to(tl.float32), KIND)
    return d


@triton.jit
def _keep(key_ptr, modes_ptr, thresholds_ptr, hash_keys_ptr, i, offs, mask):
    """1.0 where model i keeps the element, else 0.0."""
    mode = tl.load(modes_ptr + i)
    threshold = tl.load(thresholds_ptr + i)
    is_ranked = (offs * 0 + mode) == 1
    ranked = tl.load(key_ptr + offs, mask=mask & is_ranked, other=0).to(tl.int64) < threshold
    e = offs.to(tl.uint32)
    chunk = e & 0xFFC00000  # the start of its hash chunk (random_fields._CHUNK = 2**22)
    key = tl.load(hash_keys_ptr + i).to(tl.uint32)
    pair = _mix32(((e - chunk) >> 1) + (key ^ chunk))  # elements 2k, 2k + 1: its low, high half
    drawn = ((pair >> ((e & 1) * 16)) & 0xFFFF).to(tl.int64) < threshold
    keep = tl.where(mode == 0, True, tl.where(mode == 1, ranked, drawn))
    return keep.to(tl.float32)


@triton.jit
def _weighted(
    taus,
    keys,
    sub_base_ptr,
    modes_ptr,
    thresholds_ptr,
    hash_keys_ptr,
    rescale_ptr,
    weights_ptr,
    i: tl.constexpr,
    offs,
    mask,
    KIND: tl.constexpr,
    HAS_SUB: tl.constexpr,
):
    """w_i * s_i * tau_i at offs, each product rounded as torch rounds it (tv_merge.c
    weigh_block)."""
    d = _task_vector(taus[i], sub_base_ptr, offs, mask, KIND, HAS_SUB)
    kept = d * _keep(keys[i], modes_ptr, thresholds_ptr, hash_keys_ptr, i, offs, mask)
    scale = tl.load(rescale_ptr + i)
    kept = tl.where(scale == 1.0, kept, _round(kept * scale, KIND))
    return _round(kept * tl.load(weights_ptr + i), KIND)


@triton.jit
def _tv_merge_kernel(base_ptr, taus, keys, sub_base_ptr, modes_ptr, thresholds_ptr, hash_keys_ptr,
                     rescale_ptr, weights_ptr, out_ptr, nonfinite_ptr, n, plain_divisor, lambda_,
                     M: tl.constexpr, KIND: tl.constexpr, HAS_SUB: tl.constexpr,
                     CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, USE_LAMBDA: tl.constexpr,
                     BLOCK: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    args = (
        taus,
        keys,
        sub_base_ptr,
        modes_ptr,
        thresholds_ptr,
        hash_keys_ptr,
        rescale_ptr,
        weights_ptr,
    )
    total = _weighted(*args, 0, offs, mask, KIND, HAS_SUB)
    for i in tl.static_range(1, M):
        total = total + _weighted(*args, i, offs, mask, KIND, HAS_SUB)
    if CONSENSUS:
        # the second pass over the models re-reads their blocks (cached) rather than holding
        # every model's values in registers
        positive = total >= 0.0
        mixed = tl.zeros([BLOCK], tl.float32)
        divisor = tl.zeros([BLOCK], tl.float32)
        for i in tl.static_range(M):
            w = _weighted(*args, i, offs, mask, KIND, HAS_SUB)
            agree = tl.where(positive, w > 0.0, w < 0.0).to(tl.float32)
            term = w * agree
            weight = tl.load(weights_ptr + i) * agree
            mixed = mixed + term  # from +0, as torch sums (a sum of -0s is +0)
            divisor = divisor + weight
        mixed = _round(mixed, KIND)
        divisor = _round(divisor, KIND)
        divisor = tl.where(divisor == 0.0, 1.0, divisor)
    else:
        mixed = _round(
            0.0 + total, KIND
        )  # ((0 + w0) + w1) + ...: torch's sum, signed zeros included
        divisor = tl.zeros([BLOCK], tl.float32) + plain_divisor
    if NORMALIZE:
        mixed = _round(tl.math.div_rn(mixed, divisor), KIND)
    if USE_LAMBDA:
        mixed = _round(mixed * lambda_, KIND)
    base = tl.load(base_ptr + offs, mask=mask, other=0).to(tl.float32)
    merged = _round(base + mixed, KIND)  # exactly representable now: the cast below is exact
    tl.store(out_ptr + offs, merged.to(out_ptr.dtype.element_ty), mask=mask)
    # an Inf or a NaN in float32 is one in the storage type too: flag it from the registers
    nonfinite = mask & ((merged.to(tl.uint32, bitcast=True) & 0x7FFFFFFF) >= 0x7F800000)
    tl.atomic_max(nonfinite_ptr, tl.max(nonfinite.to(tl.int32), axis=0))


@triton.jit
def _abs_sums_kernel(taus, keys, sub_base_ptr, modes_ptr, thresholds_ptr, hash_keys_ptr,
                     scales_ptr, sums_ptr, n,
                     M: tl.constexpr, KIND: tl.constexpr, HAS_SUB: tl.constexpr,
                     BLOCK: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    for i in tl.static_range(M):
        d = _task_vector(taus[i], sub_base_ptr, offs, mask, KIND, HAS_SUB)
        keep = _keep(keys[i], modes_ptr, thresholds_ptr, hash_keys_ptr, i, offs, mask)
        q = (tl.abs(d).to(tl.float64) * tl.load(scales_ptr + i)).to(tl.int64)  # floor: q >= 0
        tl.atomic_add(sums_ptr + 2 * i, tl.sum(tl.where(keep > 0.0, q, 0), axis=0))
        tl.atomic_add(sums_ptr + 2 * i + 1, tl.sum(q, axis=0))


def _rule_arrays(taus, rules, device):
    """Per-model modes, thresholds, hash keys (device tensors) and key pointers."""
    modes = torch.tensor([rule.mode for rule in rules], dtype=torch.int32, device=device)
    thresholds = torch.tensor([rule.threshold for rule in rules], dtype=torch.int64, device=device)
    hash_keys = torch.tensor([rule.hash_key for rule in rules], dtype=torch.int64, device=device)
    # a model without ranks passes its task vector as a stand-in key (never read)
    keys = tuple(
        rule.tensor if rule.mode == KeepRule.KEY_BELOW else tau.x for tau, rule in zip(taus, rules)
    )
    return modes, thresholds, hash_keys, keys


def _grid(n: int):
    return (triton.cdiv(n, BLOCK),)


def abs_sums(taus, rules, scales) -> list[tuple[int, int]]:
    """(kept, all) per task vector, as cpu.abs_sums computes them on the CPU."""
    first = taus[0]
    n, device = first.x.numel(), first.x.device
    modes, thresholds, hash_keys, keys = _rule_arrays(taus, rules, device)
    sums = torch.zeros(2 * len(taus), dtype=torch.int64, device=device)
    sub_base = first.base if first.base is not None else first.x
    _abs_sums_kernel[_grid(n)](
        tuple(t.x for t in taus), keys, sub_base, modes, thresholds, hash_keys,
        torch.tensor(scales, dtype=torch.float64, device=device), sums, n,
        M=len(taus), KIND=_KIND[first.x.dtype], HAS_SUB=first.base is not None, BLOCK=BLOCK,
        **_LAUNCH,
    )  # fmt: skip
    values = sums.tolist()
    return [(values[2 * i], values[2 * i + 1]) for i in range(len(taus))]


def tv_merge(
    base, taus, rules, rescale, weights, *, consensus, normalize, plain_divisor, lambda_, out
):
    """base + lambda * sum_i(w_i m_i s_i tau_i) / Z into `out`, and whether it is all finite,
    as cpu.tv_merge on the CPU."""
    n, device = base.numel(), base.device
    nonfinite = torch.zeros(1, dtype=torch.int32, device=device)
    modes, thresholds, hash_keys, keys = _rule_arrays(taus, rules, device)
    first = taus[0]
    sub_base = first.base if first.base is not None else base
    _tv_merge_kernel[_grid(n)](
        base, tuple(t.x for t in taus), keys, sub_base, modes, thresholds, hash_keys,
        rescale.float().to(device), weights.float().to(device), out, nonfinite, n,
        float(plain_divisor), float(lambda_),
        M=len(taus), KIND=_KIND[base.dtype], HAS_SUB=first.base is not None, CONSENSUS=consensus,
        NORMALIZE=normalize, USE_LAMBDA=lambda_ != 1, BLOCK=BLOCK, **_LAUNCH,
    )  # fmt: skip
    return out, not nonfinite.item()
