"""The memory plan against what a search's candidate really holds, on the CPU, in both tiers.

`bench/search_memory.py`'s measurement at a small size: synthetic bfloat16 Llama pools (hidden
512, a base and three fine-tunes) at 2 and 6 layers; per space and tier a child process compiles
the candidate over a live model and applies the baselines and a sampled genome (densities below
1, so TIES forms its magnitude tables and DARE its draw tables); its anonymous resident memory
after `malloc_trim` (live data, not the allocator's slack) is read at the end. The slope between
the two depths over the bytes of one model cancels the process's fixed cost, and must match the
plan's (less the base, a view of its memory-mapped file here) within 10%.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SPACES = ("task_arithmetic_layers", "ties_layers", "dare_ties_layers")

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self/status and glibc's malloc_trim"
)


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    sys.path.insert(0, str(BENCH))
    from search_memory import build_pool

    root = tmp_path_factory.mktemp("memory-pools")
    for layers in (2, 6):
        build_pool(root / f"L{layers}", hidden=512, layers=layers, sources=3)
    return root


@pytest.mark.parametrize("tier", ["device", "host"])
@pytest.mark.parametrize("space", SPACES)
def test_the_plan_matches_the_memory_a_candidate_holds(pools, space, tier):
    from search_memory import _child

    small = _child(pools / "L2", space, False, True, tier)
    large = _child(pools / "L6", space, False, True, tier)
    size = large["model_bytes"] - small["model_bytes"]
    held = (large["trimmed"] - small["trimmed"]) / size
    planned = (large["plan_anon"] - small["plan_anon"]) / size
    assert planned > 3.9, planned  # three task vectors and the live model at least
    assert abs(held - planned) <= 0.10 * planned, (space, tier, held, planned)
