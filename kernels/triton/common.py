"""Pieces shared by the scan kernels: activations, the scan combiner, autotune configs, launch helpers.

Activations are written with ``tl.exp``/``tl.log`` only: libdevice functions (log1p, expm1, tanh) do not run under
the Triton interpreter, which is how the kernels are tested without a GPU.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Read once, as @triton.jit does: whether the kernels below run through the interpreter (CPU tensors, tests).
INTERPRET: bool = bool(triton.knobs.runtime.interpret)


def autotune_configs(candidates: list[tuple[int, int, int]]) -> list[triton.Config]:
    """``triton.Config`` for each (BLOCK_D, num_warps, num_stages); only the first under the interpreter.

    The interpreter cannot benchmark, and autotuning over several configs fails there.
    """
    configs = [triton.Config({'BLOCK_D': bd}, num_warps=w, num_stages=s) for bd, w, s in candidates]
    return configs[:1] if INTERPRET else configs


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def silu(x):
    return x * sigmoid(x)


@triton.jit
def silu_grad(x):
    """d silu(x) / dx."""
    s = sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


@triton.jit
def softplus(x):
    """torch's softplus (threshold 20); below -15, log(1 + e^x) would round e^x away, so e^x itself is returned."""
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def affine_combine(a1, b1, a2, b2):
    """Compose h -> a1 h + b1 (earlier in scan order) with h -> a2 h + b2 (later)."""
    return a1 * a2, b1 * a2 + b2


def tensor_strides(x, ndim: int) -> tuple[int, ...]:
    """x.stride(), checked to have ``ndim`` entries (shape errors surface here rather than inside a kernel)."""
    if x.dim() != ndim:
        raise ValueError(f'expected a {ndim}-d tensor, got shape {tuple(x.shape)}')
    return tuple(x.stride())
