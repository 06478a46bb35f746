"""The fused CPU kernel equals the torch code of the task-vector family bit for bit."""

from __future__ import annotations

import itertools

import pytest
import torch

from evomerge import kernel
from evomerge.methods.registry import MergeInputs
from evomerge.methods.task_arithmetic import _fused, combine, sparsified_delta
from evomerge.random_fields import UniformField

pytestmark = pytest.mark.skipif(kernel.library() is None, reason="no C compiler to build the kernel")


def make_inputs(dtype: torch.dtype, models: int = 3, shape=(64, 96), seed: int = 0) -> MergeInputs:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    tensors = []
    for i in range(models):
        delta = torch.randn(shape, generator=generator) * 0.01
        delta[torch.rand(shape, generator=generator) < 0.1] = 0  # exact zeros: sign 0 never votes
        if i == 1:
            delta[:4] = -delta[:4].abs()  # conflicting signs
        tensors.append((base + delta).to(dtype))
    # bf16 rounding makes many |delta| equal: stable-rank tie-breaking is exercised too
    return MergeInputs(models=tensors, base=base.to(dtype), tensor_name="layers.0.w", field=UniformField(7, "layers.0.w"))


def torch_path(inputs, weight, density, *, rule, rescale, consensus, normalize, lambda_):
    deltas = torch.stack(
        [sparsified_delta(inputs, i, rule=rule, density=density[i], rescale=rescale) for i in range(len(inputs.models))]
    )
    return combine(inputs.base, deltas, weight, consensus=consensus, normalize=normalize, lambda_=lambda_)


CASES = list(
    itertools.product(
        [torch.float32, torch.bfloat16],
        [None, "magnitude", "random"],
        [True, False],  # consensus
        [True, False],  # normalize
        [True, False],  # rescale
    )
)


@pytest.mark.parametrize("dtype,rule,consensus,normalize,rescale", CASES)
def test_kernel_matches_torch_ops(dtype, rule, consensus, normalize, rescale):
    inputs = make_inputs(dtype)
    for weight, density, lambda_ in (
        ([0.3, 0.5, 0.2], [0.5, 0.7, 0.3], 1.0),
        ([1.0, -0.4, 0.7], [1.0, 0.2, 0.9], 0.8),  # a negative weight flips a model's vote
        ([0.0, 0.0, 0.0], [0.5, 0.5, 0.5], 1.0),  # zero weights: the divisor fallbacks
        ([0.6, 0.3, 0.1], [0.0, 1e-3, 1.0], 1.3),  # density 0 and a single kept element
    ):
        options = dict(rule=rule, rescale=rescale, consensus=consensus, normalize=normalize, lambda_=lambda_)
        expected = torch_path(inputs, weight, density, **options)
        got = _fused(inputs, weight, density, **options)
        assert got.dtype == expected.dtype
        assert torch.equal(got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           expected.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), (weight, density)


def test_kernel_is_the_same_with_any_thread_count():
    inputs = make_inputs(torch.float32, shape=(512, 300))
    options = dict(rule="random", rescale=True, consensus=True, normalize=False, lambda_=1.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _fused(inputs, [0.4, 0.4, 0.4], [0.5, 0.5, 0.5], **options)
        torch.set_num_threads(2)
        two = _fused(inputs, [0.4, 0.4, 0.4], [0.5, 0.5, 0.5], **options)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
