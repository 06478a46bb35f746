"""The C kernel (tv_merge.c) for the CPU: built once per machine, called through ctypes.

The C source is compiled with the system's C compiler into the user cache
(`$XDG_CACHE_HOME/evomerge`, default `~/.cache/evomerge`); EVOMERGE_KERNEL=off disables it
(and the Triton kernel). Every function here takes CPU tensors in a kernel dtype (float32,
bfloat16, float16) that `fits` accepts; `peak` and `copy_finite` fall back to torch for others.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from evomerge.kernel.rules import KeepRule, TaskVector
from evomerge.methods import registry
from evomerge.methods.random_fields import SCALE

LOG = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("tv_merge.c")
SOURCES = [
    SOURCE,
    SOURCE.with_name("tv_merge_typed.h"),
    SOURCE.with_name("tv_merge_avx512.h"),
]  # included by the first
# -march=native: the library is built per machine (the cache key includes the CPU's flags);
# -ffp-contract=off keeps every multiply and add separately rounded, as torch does.
FLAGS = [
    "-O3",
    "-march=native",
    "-fopenmp",
    "-ffp-contract=off",
    "-fno-fast-math",
    "-fPIC",
    "-shared",
]
DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
MAX_MODELS = 64  # tv_merge.c
MAGNITUDE_TABLE_ENTRIES = 1 << 15  # tv_merge_typed.h's magnitude_table: a bucket per high half


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "evomerge"


def disabled() -> bool:
    """EVOMERGE_KERNEL=off: torch ops everywhere."""
    return os.environ.get("EVOMERGE_KERNEL", "on").lower() in ("off", "0", "false")


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None when it is disabled or cannot be built here."""
    if disabled():
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        LOG.info("no C compiler found; the merge kernel runs as torch ops")
        return None
    source = b"".join(path.read_bytes() for path in SOURCES)
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS, _cpu_flags()]).encode()).hexdigest()[
        :16
    ]
    target = _cache_dir() / f"tv_merge-{key}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                subprocess.run(
                    [compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"],
                    check=True,
                    capture_output=True,
                )
                built.replace(target)  # atomic: concurrent workers never load half a file
        except (OSError, subprocess.CalledProcessError) as exc:
            LOG.warning("could not build the merge kernel (%s); using torch ops", exc)
            return None
    lib = ctypes.CDLL(str(target))
    declare(lib)
    return lib


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def declare(lib: ctypes.CDLL) -> None:
    """The C signatures, for ctypes."""
    p, i64, f32, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    for suffix in DTYPES.values():
        signatures = {
            "abs_peak": ([p, i64], f32),
            "min_magnitude": ([p, i64], f32),
            "copy_finite": ([p, i64, p], c_int),
            "abs_sums": ([c_int, i64, p, p, ctypes.POINTER(KeepRule), p, p, p, p], None),
            "magnitude_cut": ([p, p, i64, i64, p, p], None),
            "magnitude_table": ([p, i64, p], None),
            "magnitude_cut_from": ([p, i64, i64, p, p, p], None),
            "draw_l1_table": ([p, i64, ctypes.c_uint32, ctypes.c_double, p], None),
            "tv_merge": (
                [c_int, i64, p, p, p, p, p, p, c_int, c_int, f32, c_int, f32, c_int, p],
                c_int,
            ),
        }
        for name, (argtypes, restype) in signatures.items():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes, fn.restype = argtypes, restype
    lib.set_threads.argtypes = [ctypes.c_int]


def _call(name: str, like: torch.Tensor, *args):
    lib = library()
    lib.set_threads(torch.get_num_threads())
    return getattr(lib, f"{name}_{DTYPES[like.dtype]}")(*args)


def fits(tensors: list[torch.Tensor]) -> bool:
    """Whether the C kernel takes these tensors: CPU, one shape, one kernel dtype, contiguous,
    and the library built here."""
    first = tensors[0]
    return (
        first.device.type == "cpu"
        and first.dtype in DTYPES
        and all(
            t.is_contiguous()
            and t.dtype == first.dtype
            and t.shape == first.shape
            and t.device == first.device
            for t in tensors
        )
        and first.numel() < 2**31
        and len(tensors) <= MAX_MODELS + 1  # the models, plus the base
        and library() is not None
    )


# --- tensor statistics ------------------------------------------------------------------------
def abs_peak(x: torch.Tensor) -> float:
    """max |x|: NaN if x holds a NaN, Inf for an Inf (a comparison of magnitude bits, one pass)."""
    if x.numel() == 0:
        return 0.0
    x = x.contiguous()
    return _call("abs_peak", x, x.data_ptr(), x.numel())


def peak(x: torch.Tensor) -> float:
    """abs_peak by the C kernel where it takes x, else by torch's min and max (one fast pass
    either way; isfinite().all() is 20x slower on bf16): a finiteness check of inputs."""
    return abs_peak(x) if fits([x]) else registry.abs_peak(x)


def min_magnitude(x: torch.Tensor) -> float:
    """min |x| over the nonzero elements (Inf if there are none), one pass."""
    x = x.contiguous()
    return _call("min_magnitude", x, x.data_ptr(), x.numel())


def copy_finite(source: torch.Tensor, out: torch.Tensor) -> bool:
    """out[:] = source, and whether every value is finite, checked in the copy's own pass (by
    torch in a pass of its own where the C kernel does not take both)."""
    if fits([source, out]):
        return bool(_call("copy_finite", source, source.data_ptr(), source.numel(), out.data_ptr()))
    finite = math.isfinite(peak(source)) if source.is_floating_point() else True
    out.copy_(source)
    return finite


def draw_l1_table(x: torch.Tensor, hash_key: int, scale: float) -> torch.Tensor:
    """sparsify.draw_l1_table of a task vector in one pass (scale = 2**shift; hash_key as
    KeepRule.hash_below takes it)."""
    x = x.contiguous()
    sums = torch.zeros(SCALE + 1, dtype=torch.int64)
    _call("draw_l1_table", x, x.data_ptr(), x.numel(), hash_key, scale, sums.data_ptr())
    return sums.cumsum(0)


# --- the merge --------------------------------------------------------------------------------
def top_magnitudes(tau: TaskVector, k: int, table: torch.Tensor | None = None) -> KeepRule:
    """The rule keeping the k largest |tau|, ties to lower indices (the same elements as
    magnitude ranks < k), found by a radix select instead of a sort; with `table` (the
    `magnitude_table` of a stored task vector) its first histogram pass is read, not made."""
    if k >= tau.x.numel():
        return KeepRule.keep_all()
    if k <= 0:
        return KeepRule.magnitude_cut(0xFFFFFFFF, 0)
    cut_bits, cutoff = ctypes.c_uint32(), ctypes.c_int64()
    if table is not None:
        assert tau.base is None, "a magnitude table is of a stored task vector"
        _call(
            "magnitude_cut_from", tau.x, tau.x.data_ptr(), tau.x.numel(), k, table.data_ptr(),
            ctypes.byref(cut_bits), ctypes.byref(cutoff),
        )  # fmt: skip
        return KeepRule.magnitude_cut(cut_bits.value, cutoff.value)
    _call(
        "magnitude_cut",
        tau.x,
        *tau.pointers(),
        tau.x.numel(),
        k,
        ctypes.byref(cut_bits),
        ctypes.byref(cutoff),
    )
    return KeepRule.magnitude_cut(cut_bits.value, cutoff.value)


def magnitude_table(x: torch.Tensor) -> torch.Tensor:
    """What a resident task vector keeps for TIES instead of its magnitude ranks: the counts
    of |x| per magnitude bucket (MAGNITUDE_TABLE_ENTRIES int64, 256 KiB whatever the tensor's
    size; a bucket is one bfloat16 or float16 magnitude, or the high 16 bits of a float32 one),
    one pass. Each merge's top-k then costs a partial scan for the ties at the cut (and for
    float32 one pass for the cut's low bits) instead of 4 bytes per element kept."""
    x = x.contiguous()
    table = torch.empty(MAGNITUDE_TABLE_ENTRIES, dtype=torch.int64)
    _call("magnitude_table", x, x.data_ptr(), x.numel(), table.data_ptr())
    return table


def abs_sums(
    taus: list[TaskVector], rules: list[KeepRule], scales: list[float]
) -> tuple[list[tuple[int, int]], list[KeepRule]]:
    """For each task vector: (kept, all), the sums of floor(|tau| * scale) over its kept
    elements and over every element (see sparsify.exact_abs_sum), all in one pass. The task
    vectors share one base (or none).

    Also returns the rules for the merge pass: each DARE rule becomes the bits of what it
    kept, stored in the same pass (1 bit per element: reading it is cheaper than hashing
    every element again)."""
    models = len(taus)
    first = taus[0]
    n = first.x.numel()
    xs = (ctypes.c_void_p * models)(*[t.x.data_ptr() for t in taus])
    bits = [
        torch.empty((n + 7) // 8, dtype=torch.uint8) if rule.mode == KeepRule.HASH_BELOW else None
        for rule in rules
    ]
    bits_c = (ctypes.c_void_p * models)(*[b.data_ptr() if b is not None else None for b in bits])
    kept, every = (ctypes.c_int64 * models)(), (ctypes.c_int64 * models)()
    _call(
        "abs_sums", first.x, models, n, xs, first.pointers()[1], (KeepRule * models)(*rules),
        (ctypes.c_double * models)(*scales), kept, every, bits_c,
    )  # fmt: skip
    after = [rule if b is None else KeepRule.stored_bits(b) for rule, b in zip(rules, bits)]
    return list(zip(kept, every)), after


def tv_merge(
    base: torch.Tensor,
    taus: list[TaskVector],
    rules: list[KeepRule],
    rescale: torch.Tensor,  # (M,) in the merge dtype
    weights: torch.Tensor,  # (M,) in the merge dtype
    *,
    consensus: bool,
    normalize: bool,
    plain_divisor: float,
    lambda_: float,
    out: torch.Tensor | None = None,
    subnormal_free: bool = False,
) -> tuple[torch.Tensor, bool]:
    """base + lambda * sum_i(w_i m_i s_i tau_i) / Z, all task vectors relative to one base,
    into `out` when given (a buffer like `base`), and whether every value of the result is
    finite (found as the result is stored: no second pass). `subnormal_free`: no value of
    this merge can be subnormal (task_vectors.FusedTensor.subnormal_free), which lets
    bfloat16 round with AVX512_BF16's instruction."""
    out = torch.empty_like(base) if out is None else out
    models = len(taus)
    sub_base = taus[0].base.data_ptr() if taus[0].base is not None else None
    xs = (ctypes.c_void_p * models)(*[t.x.data_ptr() for t in taus])
    rules_c = (KeepRule * models)(*rules)
    rescale_c = (ctypes.c_float * models)(*rescale.float().tolist())
    weights_c = (ctypes.c_float * models)(*weights.float().tolist())
    finite = _call(
        "tv_merge", base, models, base.numel(), base.data_ptr(), xs, sub_base, rules_c, rescale_c,
        weights_c, int(consensus), int(normalize), plain_divisor, int(lambda_ != 1), lambda_,
        int(subnormal_free), out.data_ptr(),
    )  # fmt: skip
    return out, bool(finite)
