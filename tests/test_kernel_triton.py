"""The Triton kernel against the C kernel, bit for bit: tests/kernel_triton_checks.py, run by a
pytest of its own.

Only that process imports Triton (tests/conftest.py keeps it out of this one): Triton's nanobind
bindings print about a hundred lines of "leaked instance" warnings when a process that imported
it exits, which here would land after pytest's summary; the child's output is captured instead,
and shown where a check fails.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHECKS = Path(__file__).resolve().parent / "kernel_triton_checks.py"


@pytest.mark.slow
def test_the_triton_kernel_matches_the_c_kernel():
    env = {**os.environ, "EVOMERGE_TEST_TRITON": "1"}
    if not torch.cuda.is_available():  # Triton's CPU interpreter, read when Triton is imported
        env.setdefault("TRITON_INTERPRET", "1")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(CHECKS)],
        cwd=CHECKS.parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    if " passed" not in summary:  # no Triton, or no C kernel to compare with
        pytest.skip(summary)
