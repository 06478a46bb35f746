"""The task-vector merge kernel for CUDA GPUs, in Triton.

The same computation as tv_merge.c, op for op, so a candidate merged on a GPU has the bits of
`evomerge merge` on the CPU:
  - float32 arithmetic, each op's result rounded to the storage type (bfloat16/float16) by
    integer bit operations: round-to-nearest-even, identical on every GPU and in Triton's CPU
    interpreter (which the tests run; its float-to-bfloat16 cast truncates);
  - sums over models left to right; IEEE division (div_rn); no fused multiply-adds
    (enable_fp_fusion=False);
  - DARE's draws hashed in the kernel as random_fields.py draws them; L1 sums exact in int64.

Keep rules per model (rules.KeepRule's modes): 0 keep all, 2 the DARE draw below the threshold,
3 TIES's top-k: |tau| above the cut, or at it and below the cutoff index (ties go to lower
indices, as magnitude ranks and the C kernel's radix select break them). `top_magnitudes` finds
the cut per merge on the device, as cpu.top_magnitudes does on the CPU, so that no GPU search
keeps magnitude ranks (4 bytes per element per source); the C kernel's ranks mode (1) is not
taken here.

Nothing here runs until task_vectors.gpu_ready has compared it with the CPU on the GPU at
hand. The tests run it in Triton's CPU interpreter
(tests/test_kernel_triton.py); no GPU was available to measure it on yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evomerge.kernel.rules import KeepRule, TaskVector

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
def _keep(d, modes_ptr, thresholds_ptr, hash_keys_ptr, cutoffs_ptr, i, offs):
    """1.0 where model i keeps the element (its task-vector value d), else 0.0."""
    mode = tl.load(modes_ptr + i)
    threshold = tl.load(thresholds_ptr + i)  # mode 3: the cut's float32 bits
    a = (d.to(tl.uint32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)  # |d|'s bits: its order
    at_cut = (a == threshold) & (offs.to(tl.int64) < tl.load(cutoffs_ptr + i))
    top = (a > threshold) | at_cut
    e = offs.to(tl.uint32)
    chunk = e & 0xFFC00000  # the start of its hash chunk (random_fields._CHUNK = 2**22)
    key = tl.load(hash_keys_ptr + i).to(tl.uint32)
    pair = _mix32(((e - chunk) >> 1) + (key ^ chunk))  # elements 2k, 2k + 1: its low, high half
    drawn = ((pair >> ((e & 1) * 16)) & 0xFFFF).to(tl.int64) < threshold
    keep = tl.where(mode == 0, True, tl.where(mode == 3, top, drawn))
    return keep.to(tl.float32)


@triton.jit
def _weighted(
    taus,
    sub_base_ptr,
    modes_ptr,
    thresholds_ptr,
    hash_keys_ptr,
    cutoffs_ptr,
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
    kept = d * _keep(d, modes_ptr, thresholds_ptr, hash_keys_ptr, cutoffs_ptr, i, offs)
    scale = tl.load(rescale_ptr + i)
    kept = tl.where(scale == 1.0, kept, _round(kept * scale, KIND))
    return _round(kept * tl.load(weights_ptr + i), KIND)


@triton.jit
def _tv_merge_kernel(base_ptr, taus, sub_base_ptr, modes_ptr, thresholds_ptr, hash_keys_ptr,
                     cutoffs_ptr, rescale_ptr, weights_ptr, out_ptr, nonfinite_ptr, n,
                     plain_divisor, lambda_,
                     M: tl.constexpr, KIND: tl.constexpr, HAS_SUB: tl.constexpr,
                     CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, USE_LAMBDA: tl.constexpr,
                     BLOCK: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    args = (
        taus,
        sub_base_ptr,
        modes_ptr,
        thresholds_ptr,
        hash_keys_ptr,
        cutoffs_ptr,
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
def _abs_sums_kernel(taus, sub_base_ptr, modes_ptr, thresholds_ptr, hash_keys_ptr, cutoffs_ptr,
                     scales_ptr, sums_ptr, n,
                     M: tl.constexpr, KIND: tl.constexpr, HAS_SUB: tl.constexpr,
                     BLOCK: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    for i in tl.static_range(M):
        d = _task_vector(taus[i], sub_base_ptr, offs, mask, KIND, HAS_SUB)
        keep = _keep(d, modes_ptr, thresholds_ptr, hash_keys_ptr, cutoffs_ptr, i, offs)
        q = (tl.abs(d).to(tl.float64) * tl.load(scales_ptr + i)).to(tl.int64)  # floor: q >= 0
        tl.atomic_add(sums_ptr + 2 * i, tl.sum(tl.where(keep > 0.0, q, 0), axis=0))
        tl.atomic_add(sums_ptr + 2 * i + 1, tl.sum(q, axis=0))


@triton.jit
def _count_at_kernel(x_ptr, sub_base_ptr, counts_ptr, cut_bits, n,
                     KIND: tl.constexpr, HAS_SUB: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """counts[block]: how many elements of the block have |tau| == the cut (float32 bits),
    tau as the merge reads it."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d = _task_vector(x_ptr, sub_base_ptr, offs, mask, KIND, HAS_SUB)
    at = mask & ((d.to(tl.uint32, bitcast=True) & 0x7FFFFFFF) == cut_bits)
    tl.store(counts_ptr + tl.program_id(0), tl.sum(at.to(tl.int32), axis=0))


# --- TIES's top-k on the device, per merge ---------------------------------------------------
TABLE_ENTRIES = 1 << 15  # cpu.MAGNITUDE_TABLE_ENTRIES: a bucket per magnitude's high half
SELECT_SLICE = 1 << 22  # elements per step of a histogram: bounds its workspace (<= 16 B each)


def magnitude_table(x: torch.Tensor) -> torch.Tensor:
    """cpu.magnitude_table of `x` made with torch ops on its device (the same counts, int64, on
    that device): the number of |x| per bucket, a bucket being one bfloat16 or float16
    magnitude or the high 16 bits of a float32 one."""
    return _histogram(TaskVector(x), _high_half if x.dtype == torch.float32 else None)


def _high_half(a: torch.Tensor) -> torch.Tensor:
    return a >> 16


def _histogram(tau: TaskVector, bucket=None, entries: int = TABLE_ENTRIES, where=None):
    """Counts of bucket(|tau| bits) (default: the bits) over the elements (where `where`
    holds), SELECT_SLICE elements at a time."""
    table = torch.zeros(entries, dtype=torch.int64, device=tau.x.device)
    for start in range(0, tau.x.numel(), SELECT_SLICE):
        a = _magnitude_bits(_slice(tau, start, SELECT_SLICE))
        a = a if where is None else a[where(a)]
        table += torch.bincount(a if bucket is None else bucket(a), minlength=entries)
    return table


def _slice(tau: TaskVector, start: int, length: int) -> torch.Tensor:
    """tau[start:start + length] of the flattened task vector, as the kernels read it (x - base
    rounded to the storage type, as torch rounds it, where it is subtracted on the fly)."""
    part = tau.x.flatten()[start : start + length]
    return part if tau.base is None else part - tau.base.flatten()[start : start + length]


def _magnitude_bits(part: torch.Tensor) -> torch.Tensor:
    """|part| as integers in the same order: float32's bits, or the 16-bit type's (int32)."""
    if part.dtype == torch.float32:
        return part.view(torch.int32) & 0x7FFFFFFF
    return (part.view(torch.int16) & 0x7FFF).int()


def _from_top(table: torch.Tensor, k: int) -> tuple[int, int, int]:
    """The bucket holding the k-th largest element (counting from the last bucket down), how
    many of its elements are among the k, and how many it holds (read on the host: one copy of
    a table made on the device, not a synchronisation per number)."""
    table = table.cpu()
    above = table.flip(0).cumsum(0)
    position = int(torch.searchsorted(above, torch.tensor([k])))
    bucket = table.numel() - 1 - position
    need = k - (int(above[position - 1]) if position else 0)
    return bucket, need, int(table[bucket])


def top_magnitudes(tau: TaskVector, k: int, table: torch.Tensor | None = None) -> KeepRule:
    """The rule keeping the k largest |tau|, ties to lower indices: cpu.top_magnitudes on the
    device of `tau` (its `magnitude_table`, kept by a resident tensor, may be on the host)."""
    return top_magnitudes_of([tau], [k], [table])[0]


def top_magnitudes_of(
    taus: list[TaskVector], ks: list[int], tables: list[torch.Tensor | None]
) -> list[KeepRule]:
    """`top_magnitudes` of several task vectors (one tensor's models), their cutoffs found on
    the device one after another and read back together: one synchronisation, not one each."""
    found = [_top_magnitudes(tau, k, table) for tau, k, table in zip(taus, ks, tables)]
    searched = [cutoff for _, cutoff in found if cutoff is not None]
    cutoffs = iter(torch.cat(searched).tolist() if searched else [])
    for rule, cutoff in found:
        if cutoff is not None:
            rule.cutoff = next(cutoffs)
    return [rule for rule, _ in found]


def _top_magnitudes(tau: TaskVector, k: int, table: torch.Tensor | None):
    """The rule, and where its cutoff is still to be read: a (1,) tensor on the device, or None.

    The bucket of the cut is read from the table (made here, one pass, without one); float32
    then finds the cut's low 16 bits by a histogram of that bucket (a pass). Where the k end
    inside the elements equal to the cut (usual: a 16-bit bucket is one value), a pass counts
    them per kernel block (4 bytes a block) and the block holding the last kept one is searched:
    the cutoff index. At most two passes over tau, reading it as the merge does, each merge
    and model; a bounded workspace; no per-element state kept between merges."""
    n = tau.x.numel()
    if k >= n:
        return KeepRule.keep_all(), None
    if k <= 0:
        return KeepRule.magnitude_cut(0xFFFFFFFF, 0), None
    dtype, device = tau.x.dtype, tau.x.device
    if table is None:
        table = _histogram(tau, _high_half if dtype == torch.float32 else None)
    bucket, need, count = _from_top(table, k)
    key = bucket  # the cut as _magnitude_bits orders it
    if dtype == torch.float32:
        low = _histogram(tau, lambda a: a & 0xFFFF, 1 << 16, where=lambda a: a >> 16 == bucket)
        low_bucket, need, count = _from_top(low, need)
        key = cut_bits = bucket << 16 | low_bucket
    elif dtype == torch.bfloat16:
        cut_bits = bucket << 16
    else:
        half = torch.tensor([bucket], dtype=torch.int16).view(torch.float16)
        cut_bits = int(half.float().view(torch.int32))
    if need == count:  # every element at the cut is kept
        return KeepRule.magnitude_cut(cut_bits, n), None
    counts = torch.empty(triton.cdiv(n, BLOCK), dtype=torch.int32, device=device)
    x = tau.x
    _count_at_kernel[_grid(n)](
        x, tau.base if tau.base is not None else x, counts, cut_bits, n,
        KIND=_KIND[dtype], HAS_SUB=tau.base is not None, BLOCK=BLOCK, **_LAUNCH,
    )  # fmt: skip
    running = counts.cumsum(0)
    block = torch.searchsorted(running, torch.tensor([need], device=device))  # (1,)
    before = torch.where(block > 0, running[(block - 1).clamp(min=0)], 0)
    offs = block * BLOCK + torch.arange(BLOCK, device=device)  # that block's elements
    inside = offs < n
    at = _magnitude_bits(_gather(tau, offs.clamp(max=n - 1))) == key
    last = torch.searchsorted((at & inside).cumsum(0), need - before)  # its place in the block
    return KeepRule.magnitude_cut(cut_bits, -1), offs[last] + 1


def _gather(tau: TaskVector, index: torch.Tensor) -> torch.Tensor:
    """tau at `index` (flat), as `_slice` reads it."""
    part = tau.x.flatten()[index]
    return part if tau.base is None else part - tau.base.flatten()[index]


def _rule_arrays(rules, device):
    """Per-model modes, thresholds (a magnitude rule's: its cut), hash keys and cutoffs, as
    device tensors."""
    taken = (KeepRule.KEEP_ALL, KeepRule.HASH_BELOW, KeepRule.MAGNITUDE)
    if any(rule.mode not in taken for rule in rules):
        raise ValueError(
            f"the Triton kernel takes keep rules of modes {taken}, not "
            f"{sorted({rule.mode for rule in rules} - set(taken))} (use top_magnitudes for TIES)"
        )
    magnitude = [rule.mode == KeepRule.MAGNITUDE for rule in rules]
    thresholds = [r.cut_bits if m else r.threshold for r, m in zip(rules, magnitude)]
    columns = (
        [rule.mode for rule in rules],
        thresholds,
        [rule.hash_key for rule in rules],
        [rule.cutoff for rule in rules],
    )
    table = torch.tensor(columns, dtype=torch.int64).to(device)  # one copy to the device
    return table[0].to(torch.int32), table[1], table[2], table[3]


def _grid(n: int):
    return (triton.cdiv(n, BLOCK),)


def abs_sums(taus, rules, scales) -> list[tuple[int, int]]:
    """(kept, all) per task vector, as cpu.abs_sums computes them on the CPU."""
    first = taus[0]
    n, device = first.x.numel(), first.x.device
    modes, thresholds, hash_keys, cutoffs = _rule_arrays(rules, device)
    sums = torch.zeros(2 * len(taus), dtype=torch.int64, device=device)
    sub_base = first.base if first.base is not None else first.x
    _abs_sums_kernel[_grid(n)](
        tuple(t.x for t in taus), sub_base, modes, thresholds, hash_keys, cutoffs,
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
    modes, thresholds, hash_keys, cutoffs = _rule_arrays(rules, device)
    first = taus[0]
    sub_base = first.base if first.base is not None else base
    _tv_merge_kernel[_grid(n)](
        base, tuple(t.x for t in taus), sub_base, modes, thresholds, hash_keys, cutoffs,
        rescale.float().to(device), weights.float().to(device), out, nonfinite, n,
        float(plain_divisor), float(lambda_),
        M=len(taus), KIND=_KIND[base.dtype], HAS_SUB=first.base is not None, CONSENSUS=consensus,
        NORMALIZE=normalize, USE_LAMBDA=lambda_ != 1, BLOCK=BLOCK, **_LAUNCH,
    )  # fmt: skip
    return out, not nonfinite.item()
