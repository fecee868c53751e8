"""Autotuning must not change results.

On a GPU, Triton's autotuner times each config by running the kernel several times on the call's own buffers, then
runs the winner. A kernel that updates a buffer in place needs that buffer in ``restore_value`` (one that
accumulates with atomics, in ``reset_to_zero``), or the first call at each new autotune key returns a corrupted
result. The first GPU run (2026-11-26, H100) found exactly that: the forward's segment-boundary walk, in place on
the segment states, ran once per benchmark repetition, and a third of the random GPU cases failed on their first call.

The interpreter cannot time kernels, so here every kernel gets all its GPU configs and a stand-in benchmark that
runs each config three times, as ``do_bench`` would, with Triton's own pre- and post-hooks around each run.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip('triton')

from vim.kernels.triton import AUTOTUNED_KERNELS, CONFIGS, bwd, fwd  # noqa: E402

from tests.kernels.test_triton_conv_interpreter import check_conv_against_reference, make_conv_inputs  # noqa: E402
from tests.kernels.test_triton_interpreter import (  # noqa: E402,F401  (nan_filled_empty: autouse fixture)
    check_against_reference,
    make_inputs,
    nan_filled_empty,
)

REPEATS = 3


def run_like_do_bench(kernel_call, quantiles, timed: list | None = None) -> list[float]:
    """A stand-in for the autotuner's ``do_bench``: runs the config ``REPEATS`` times, every config 'takes' 1 ms."""
    for _ in range(REPEATS):
        kernel_call()
    if timed is not None:
        timed.append(1)
    return [1.0, 1.0, 1.0]


@pytest.fixture
def benchmarked_autotuning(monkeypatch) -> list[int]:
    """Every autotuned kernel with all its GPU configs, an empty cache, and ``run_like_do_bench`` as its benchmark.
    Returns the list the benchmark appends to (one entry per timed config)."""
    timed = []
    for kernel in AUTOTUNED_KERNELS:
        monkeypatch.setattr(kernel, 'configs', list(CONFIGS[kernel.fn.__name__]))
        monkeypatch.setattr(kernel, 'cache', {})
        # do_bench is a cached_property of the autotuner
        monkeypatch.setitem(kernel.__dict__, 'do_bench', lambda call, quantiles: run_like_do_bench(call, quantiles,
                                                                                                   timed))
    return timed


def test_scan_autotuning_leaves_results_unchanged(benchmarked_autotuning, monkeypatch):
    monkeypatch.setattr(fwd, 'MIN_SEGMENT', 1)  # segments of one chunk: the tiny sequence runs the split passes
    x = make_inputs(1, 10, 13, 4, torch.float32, seed=3)
    assert fwd.plan_segments(1, 10, 13, 4)[1] > 2  # the boundary walk crosses several segments
    assert bwd.plan_backward_segments(1, 10, 13, 4)[1] > 2  # the backward's too (the same kernel, reversed)
    check_against_reference(x, chunk_size=4, seed=3)
    scan_kernels = [k for k in AUTOTUNED_KERNELS if 'conv' not in k.fn.__name__]
    assert len(benchmarked_autotuning) == sum(len(CONFIGS[k.fn.__name__]) for k in scan_kernels
                                              if len(CONFIGS[k.fn.__name__]) > 1)


def test_conv_autotuning_leaves_results_unchanged(benchmarked_autotuning):
    check_conv_against_reference(*make_conv_inputs(1, 10, 9, 4, torch.float32, 'mixer', seed=9), seed=9)
    assert benchmarked_autotuning  # the conv kernels were benchmarked
