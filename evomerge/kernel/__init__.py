"""The fused CPU kernel for the task-vector family (task arithmetic, TIES, DARE).

Per trial the search re-merges every tensor from resident task vectors, ranks and random
draws. With torch ops that is a dozen passes over memory per tensor; `tv_merge.c` does it in
one pass (plus one per model for DARE's L1 rescale), multi-threaded. It follows the torch
code of `evomerge.methods.task_arithmetic` op for op, so results are bit-identical
(tests/test_kernel.py); where it does not apply (other devices or dtypes, breadcrumbs/della,
no C compiler) the torch code runs instead.

The C source is compiled once per machine with the system's C compiler into the user cache
(`$XDG_CACHE_HOME/evomerge`, default `~/.cache/evomerge`); set EVOMERGE_KERNEL=off to disable it.
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
from typing import Optional

import torch

LOG = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("tv_merge.c")
# -march=native: the library is built per machine (the cache key includes the CPU's flags);
# -ffp-contract=off keeps every multiply and add separately rounded, as torch does.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared"]
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "evomerge"


@lru_cache(maxsize=1)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, or None when it is disabled or cannot be built here."""
    if os.environ.get("EVOMERGE_KERNEL", "on").lower() in ("off", "0", "false"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        LOG.info("no C compiler found; the merge kernel runs as torch ops")
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS, _cpu_flags()]).encode()).hexdigest()[:16]
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


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
    for suffix in _DTYPES.values():
        kept = getattr(lib, f"kept_abs_sum_{suffix}")
        kept.argtypes, kept.restype = [p, p, i32, i64, ctypes.c_double], i64
        merge = getattr(lib, f"tv_merge_{suffix}")
        merge.argtypes = [ctypes.c_int, i64, p, p, p, p, p, p, ctypes.c_int, ctypes.c_int, f32, ctypes.c_int, f32, p]
        merge.restype = None
    lib.set_threads.argtypes = [ctypes.c_int]
    lib.max_models.restype = ctypes.c_int


def applies(tensors: list[torch.Tensor]) -> bool:
    first = tensors[0]
    return (
        first.device.type == "cpu"
        and first.dtype in _DTYPES
        and all(t.is_contiguous() and t.dtype == first.dtype for t in tensors)
        and first.numel() < 2**31
    )


def kept_abs_sum(delta: torch.Tensor, key: Optional[torch.Tensor], threshold: int, scale: float) -> int:
    """sum of floor(|delta| * scale) over the kept elements (see sparsify.exact_abs_sum)."""
    lib = library()
    fn = getattr(lib, f"kept_abs_sum_{_DTYPES[delta.dtype]}")
    lib.set_threads(torch.get_num_threads())
    return fn(delta.data_ptr(), key.data_ptr() if key is not None else None, threshold, delta.numel(), scale)


def tv_merge(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    keys: list[Optional[torch.Tensor]],
    thresholds: list[int],
    rescale: torch.Tensor,  # (M,) in the merge dtype
    weights: torch.Tensor,  # (M,) in the merge dtype
    *,
    consensus: bool,
    normalize: bool,
    plain_divisor: float,
    lambda_: float,
) -> torch.Tensor:
    lib = library()
    models = len(deltas)
    out = torch.empty_like(base)
    pointers = ctypes.c_void_p * models
    delta_ptrs = pointers(*[d.data_ptr() for d in deltas])
    key_ptrs = pointers(*[k.data_ptr() if k is not None else None for k in keys])
    thresholds_c = (ctypes.c_int32 * models)(*thresholds)
    rescale_c = (ctypes.c_float * models)(*rescale.float().tolist())
    weights_c = (ctypes.c_float * models)(*weights.float().tolist())
    lib.set_threads(torch.get_num_threads())
    getattr(lib, f"tv_merge_{_DTYPES[base.dtype]}")(
        models, base.numel(), base.data_ptr(), delta_ptrs, key_ptrs, thresholds_c, rescale_c, weights_c,
        int(consensus), int(normalize), plain_divisor, int(lambda_ != 1), lambda_, out.data_ptr(),
    )  # fmt: skip
    return out
