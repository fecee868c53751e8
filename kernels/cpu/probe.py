"""The CPU's rate for the scan's exp (the fp32 decay exp of the kernels), for the exp-bound floor in benchmarks."""
from __future__ import annotations

import time

import torch

from .build import load_extension

__all__ = ['exp_rate']


def exp_rate(min_time: float = 0.5, elements: int = 1 << 14) -> float:
    """exp() per second of the kernels' fp32 exp over an in-cache buffer, on torch.get_num_threads() threads: the best
    of a few timed passes of at least ``min_time`` seconds in all."""
    ext = load_extension()
    x = -10 * torch.rand(elements)
    ext.exp2_probe(x, 10)  # warm-up
    best, spent, reps = 0.0, 0.0, 64
    while spent < min_time:
        start = time.perf_counter()
        ext.exp2_probe(x, reps)
        elapsed = time.perf_counter() - start
        spent += elapsed
        best = max(best, reps * elements / elapsed)
        reps = reps * 2 if elapsed < 0.05 else reps
    return best
