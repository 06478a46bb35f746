"""bench/pool_variants.py refuses a bad `--set` before it trains anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "pool_variants.py"


@pytest.mark.parametrize(
    "pair, message",
    [
        (
            "spec_lrr=1e-3",
            "'spec_lrr=1e-3': not a field of PoolSize; give key=value with key one of hidden,",
        ),
        ("base_steps=1.5", "'base_steps=1.5': base_steps takes a whole number"),
        ("replay=lots", "'replay=lots': 'lots' is not a number"),
        ("replay", "'replay': not a field of PoolSize"),
    ],
)
def test_a_bad_override_is_one_usage_error(pair: str, message: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--set", "spec_lr=1e-3", pair],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
