"""pytest plugin (listed in conftest.py): the mergekit environment as a session fixture.

Tests run with one torch thread unless they say otherwise, so that float reductions are summed
in one order and golden comparisons are reproducible.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mergekit_python():
    """The python of a mergekit 0.1.5 environment (see mergekit_env.py), or skip."""
    from helpers.mergekit_env import mergekit_python_or_reason

    python, reason = mergekit_python_or_reason()
    if python is None:
        pytest.skip(reason)
    return python
