"""The fused kernels for the task-vector family (task arithmetic, TIES, DARE).

Per trial the search re-merges every tensor from resident task vectors, ranks and random
draws. With torch ops that is a dozen passes over memory per tensor; `tv_merge.c` does it on
the CPU in one pass (plus one over all models for DARE's L1 rescale), multi-threaded, and
`triton_merge.py` on CUDA GPUs. Both follow the torch code of
`evomerge.methods.task_arithmetic` op for op, so results are bit-identical
(tests/test_kernel.py, tests/test_kernel_triton.py); where neither applies (other devices or
dtypes, breadcrumbs/della, no C compiler, no Triton) the torch code runs instead.

The C source is compiled once per machine with the system's C compiler into the user cache
(`$XDG_CACHE_HOME/evomerge`, default `~/.cache/evomerge`); EVOMERGE_KERNEL=off disables both kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Optional

import torch

LOG = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("tv_merge.c")
SOURCES = [SOURCE, SOURCE.with_name("tv_merge_typed.h"), SOURCE.with_name("tv_merge_avx512.h")]  # included by the first
# -march=native: the library is built per machine (the cache key includes the CPU's flags);
# -ffp-contract=off keeps every multiply and add separately rounded, as torch does.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared"]
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "evomerge"


@lru_cache(maxsize=1)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, or None when it is disabled or cannot be built here."""
    if _disabled():
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        LOG.info("no C compiler found; the merge kernel runs as torch ops")
        return None
    source = b"".join(path.read_bytes() for path in SOURCES)
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS, _cpu_flags()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"tv_merge-{key}.so"
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], check=True, capture_output=True)
                built.replace(target)  # atomic: concurrent workers never load half a file
        except (OSError, subprocess.CalledProcessError) as exc:
            LOG.warning("could not build the merge kernel (%s); using torch ops", exc)
            return None
    lib = ctypes.CDLL(str(target))
    _declare(lib)
    return lib


def _disabled() -> bool:
    return os.environ.get("EVOMERGE_KERNEL", "on").lower() in ("off", "0", "false")


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


class TaskVector(NamedTuple):
    """tau = x - base as the kernel reads it: a stored task vector (base None), or a model and
    the base, subtracted on the fly (a one-shot merge then never stores tau at all)."""

    x: torch.Tensor
    base: Optional[torch.Tensor] = None

    def pointers(self) -> tuple[int, Optional[int]]:
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
    def keep_all(cls) -> "KeepRule":
        return cls(mode=cls.KEEP_ALL)

    @property
    def keeps_all(self) -> bool:
        return self.mode == self.KEEP_ALL

    @classmethod
    def key_below(cls, key: torch.Tensor, threshold: int) -> "KeepRule":
        """key[e] < threshold, e.g. precomputed magnitude ranks (int32)."""
        rule = cls(mode=cls.KEY_BELOW, threshold=threshold, key=key.data_ptr())
        rule.tensor = key
        return rule

    @classmethod
    def hash_below(cls, hash_key: int, threshold: int) -> "KeepRule":
        """The DARE draw of each element (random_fields.UniformField) < threshold (at most
        random_fields.SCALE, as keep_threshold gives it)."""
        return cls(mode=cls.HASH_BELOW, threshold=threshold, hash_key=hash_key)

    @classmethod
    def stored_bits(cls, bits: torch.Tensor) -> "KeepRule":
        """Element e kept where bit e % 8 of bits[e // 8] is set (abs_sums stores them)."""
        rule = cls(mode=cls.BITS, bits=bits.data_ptr())
        rule.tensor = bits
        return rule

    @classmethod
    def top_magnitudes(cls, tau: TaskVector, k: int) -> "KeepRule":
        """The k largest |tau|, ties to lower indices (same as magnitude ranks < k)."""
        if k >= tau.x.numel():
            return cls.keep_all()
        if k <= 0:
            return cls(mode=cls.MAGNITUDE, cut_bits=0xFFFFFFFF, cutoff=0)
        cut_bits, cutoff = ctypes.c_uint32(), ctypes.c_int64()
        _call("magnitude_cut", tau.x, *tau.pointers(), tau.x.numel(), k, ctypes.byref(cut_bits), ctypes.byref(cutoff))
        return cls(mode=cls.MAGNITUDE, cut_bits=cut_bits.value, cutoff=cutoff.value)


def _call(name: str, like: torch.Tensor, *args):
    lib = library()
    lib.set_threads(torch.get_num_threads())
    return getattr(lib, f"{name}_{_DTYPES[like.dtype]}")(*args)


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    for suffix in _DTYPES.values():
        signatures = {
            "abs_peak": ([p, i64], f32),
            "min_magnitude": ([p, i64], f32),
            "abs_sums": ([ctypes.c_int, i64, p, p, ctypes.POINTER(KeepRule), p, p, p, p], None),
            "magnitude_cut": ([p, p, i64, i64, p, p], None),
            "draw_l1_table": ([p, i64, ctypes.c_uint32, ctypes.c_double, p], None),
            "tv_merge": ([ctypes.c_int, i64, p, p, p, p, p, p, ctypes.c_int, ctypes.c_int, f32, ctypes.c_int, f32, ctypes.c_int, p], None),
        }
        for name, (argtypes, restype) in signatures.items():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes, fn.restype = argtypes, restype
    lib.set_threads.argtypes = [ctypes.c_int]


def applies(tensors: list[torch.Tensor]) -> bool:
    """Whether a fused kernel takes these tensors (one shape, one dtype): the C kernel on the
    CPU when it is built here, the Triton kernel on a CUDA GPU where it passed its self-check."""
    first = tensors[0]
    fits = (
        first.dtype in _DTYPES
        and all(t.is_contiguous() and t.dtype == first.dtype and t.shape == first.shape for t in tensors)
        and first.numel() < 2**31
        and len(tensors) <= 65  # MAX_MODELS in tv_merge.c, plus the base
    )
    if not fits:
        return False
    if first.device.type == "cpu":
        return library() is not None
    return first.device.type == "cuda" and gpu_ready(first.device, first.dtype)


@lru_cache(maxsize=None)
def gpu_ready(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton kernel runs on this GPU and gives the CPU's bits for this dtype: it
    is checked once per process against the CPU merge on small random inputs, every rule
    included; on any failure the torch code runs instead, with a warning."""
    if _disabled():
        return False
    try:
        from evomerge.methods.task_arithmetic import kernel_self_check

        mismatch = kernel_self_check(device, dtype)
    except Exception as exc:  # no triton, a compile error, a driver problem
        LOG.warning("the Triton merge kernel is unavailable on %s (%s); using torch ops", device, exc)
        return False
    if mismatch:
        LOG.warning("the Triton merge kernel differs from the CPU on %s for %s (%s); using torch ops", device, dtype, mismatch)
    return not mismatch


def abs_peak(x: torch.Tensor) -> float:
    """max |x| of a CPU tensor in a kernel dtype: NaN if x holds a NaN, Inf for an Inf (a
    comparison of magnitude bits, one pass)."""
    if x.numel() == 0:
        return 0.0
    return _call("abs_peak", x, x.contiguous().data_ptr(), x.numel())


def min_magnitude(x: torch.Tensor) -> float:
    """min |x| over the nonzero elements of a CPU tensor in a kernel dtype (Inf if there are
    none), one pass."""
    return _call("min_magnitude", x, x.contiguous().data_ptr(), x.numel())


def draw_l1_table(x: torch.Tensor, hash_key: int, scale: float) -> torch.Tensor:
    """sparsify.draw_l1_table of a CPU task vector in one pass (scale = 2**shift; hash_key as
    KeepRule.hash_below takes it)."""
    from evomerge.random_fields import SCALE

    sums = torch.zeros(SCALE + 1, dtype=torch.int64)
    _call("draw_l1_table", x, x.contiguous().data_ptr(), x.numel(), hash_key, scale, sums.data_ptr())
    return sums.cumsum(0)


def abs_sums(
    taus: list[TaskVector], rules: list[KeepRule], scales: list[float]
) -> tuple[list[tuple[int, int]], list[KeepRule]]:
    """For each task vector: (kept, all), the sums of floor(|tau| * scale) over its kept
    elements and over every element (see sparsify.exact_abs_sum), all in one pass. The task
    vectors share one base (or none).

    Also returns the rules for the merge pass: each DARE rule becomes the bits of what it
    kept, stored in the same pass (1 bit per element: reading it is cheaper than hashing
    every element again)."""
    if taus[0].x.is_cuda:  # the GPU hashes again in the merge pass: compute is cheap there
        from evomerge.kernel import triton_merge

        return triton_merge.abs_sums(taus, rules, scales), rules
    models = len(taus)
    first = taus[0]
    n = first.x.numel()
    xs = (ctypes.c_void_p * models)(*[t.x.data_ptr() for t in taus])
    bits = [torch.empty((n + 7) // 8, dtype=torch.uint8) if rule.mode == KeepRule.HASH_BELOW else None for rule in rules]
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
    out: Optional[torch.Tensor] = None,
    subnormal_free: bool = False,
) -> torch.Tensor:
    """base + lambda * sum_i(w_i m_i s_i tau_i) / Z, all task vectors relative to one base,
    into `out` when given (a buffer like `base`: the live model's parameter in the search, a
    buffer lent by the output writer in a plain merge). `subnormal_free`: no value of this
    merge can be subnormal (task_arithmetic._subnormal_free), which lets bfloat16 round with
    AVX512_BF16's instruction."""
    out = torch.empty_like(base) if out is None else out
    if base.is_cuda:
        from evomerge.kernel import triton_merge

        return triton_merge.tv_merge(base, taus, rules, rescale, weights, consensus=consensus, normalize=normalize,
                                     plain_divisor=plain_divisor, lambda_=lambda_, out=out)  # fmt: skip
    models = len(taus)
    sub_base = taus[0].base.data_ptr() if taus[0].base is not None else None
    xs = (ctypes.c_void_p * models)(*[t.x.data_ptr() for t in taus])
    rules_c = (KeepRule * models)(*rules)
    rescale_c = (ctypes.c_float * models)(*rescale.float().tolist())
    weights_c = (ctypes.c_float * models)(*weights.float().tolist())
    _call(
        "tv_merge", base, models, base.numel(), base.data_ptr(), xs, sub_base, rules_c, rescale_c, weights_c,
        int(consensus), int(normalize), plain_divisor, int(lambda_ != 1), lambda_, int(subnormal_free), out.data_ptr(),
    )  # fmt: skip
    return out
