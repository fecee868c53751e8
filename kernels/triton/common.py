"""Pieces shared by the scan kernels: activations, the scan combiner, autotune configs, launch helpers.

Activations are written with ``tl.exp``/``tl.exp2``/``tl.log`` and arithmetic only: libdevice functions (log1p,
expm1, tanh) and inline assembly do not run under the Triton interpreter, which is how the kernels are tested
without a GPU.
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

# Read once, as @triton.jit does: whether the kernels below run through the interpreter (CPU tensors, tests).
INTERPRET: bool = bool(triton.knobs.runtime.interpret)
LOG2E: float = math.log2(math.e)


def autotune_configs(candidates: list[tuple[int, ...] | triton.Config]) -> list[triton.Config]:
    """``triton.Config`` for each (BLOCK_D, num_warps, num_stages[, UNROLL]); only the first under the interpreter.

    The interpreter cannot benchmark, and autotuning over several configs fails there. Tests that cover every
    config set ``kernel.configs`` to each in turn (they read the full list from ``all_configs``).
    """
    configs = all_configs(candidates)
    return configs[:1] if INTERPRET else configs


def all_configs(candidates: list[tuple[int, ...] | triton.Config]) -> list[triton.Config]:
    """(BLOCK_D, num_warps, num_stages) or (BLOCK_D, num_warps, num_stages, UNROLL) -> ``triton.Config``; a
    ``triton.Config`` as it is."""
    return [c if isinstance(c, triton.Config) else
            triton.Config({'BLOCK_D': c[0], **({'UNROLL': c[3]} if len(c) > 3 else {})}, num_warps=c[1],
                          num_stages=c[2]) for c in candidates]


@triton.jit
def pick(X, index, i):
    """Row i (X's axis 0, which lives inside each thread, numbered by ``index``) of an fp32 tile: a register pick.

    Summed as int32 bits: the other rows' zeros then fold away (x + 0 is x). As a float sum each pick kept one
    ``FADD x, +0.0`` (not x when x is -0.0, so the compiler may not drop it): 2 per element in the backward's state
    loop (SASS, triton 3.6 and 3.8)."""
    bits = tl.where(index == i, X.to(tl.int32, bitcast=True), 0)
    return tl.sum(bits, axis=0).to(tl.float32, bitcast=True)


@triton.jit
def sigmoid(x):
    # exp2 of x log2 e, as tl.exp computes it, but compiled to one MUFU.EX2 (tl.exp's fp32 lowering adds 4
    # instructions that keep results below 2^-126 from flushing to zero, which 1 + e^-x cannot see)
    return 1.0 / (1.0 + tl.exp2(x * -1.4426950408889634))


@triton.jit
def silu(x):
    return x * sigmoid(x)


@triton.jit
def silu_grad(x):
    """d silu(x) / dx."""
    s = sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


@triton.jit
def _exp_accurate(x):
    """e^x for x <= 0 to a few fp32 ulp on the GPU too: ``tl.exp`` there is ex2.approx(x * log2 e), whose rounded
    product loses up to 1.3e-6 relative at |x| = 30; the product's rounding error is added back to first order."""
    t = x * 1.4426950408889634
    # x log2(e) - t: the product's rounding error, and x times log2(e)'s low part (log2 e - fp32(log2 e))
    r = tl.fma(x, 1.4426950408889634, -t) + x * 1.925962989091e-08
    return tl.exp2(t) * (1.0 + r * 0.6931471805599453)


@triton.jit
def _log1p_unit(v):
    """log(1 + v) for v in [0, 1] as v (1 + v Q(v)), Q of degree 7 fitted for the relative error of log1p (1.6e-7
    evaluated in fp32 with FMA, 1.8e-7 without; exact as v -> 0). ``log(1 + v)`` would lose v's low bits to the
    rounding of 1 + v; the series in s = v / (2 + v) this replaced cost a division and ~9 more instructions."""
    p = 0.0053646355
    p = p * v - 0.030065037
    p = p * v + 0.07920331
    p = p * v - 0.13753699
    p = p * v + 0.19153607
    p = p * v - 0.24857152
    p = p * v + 0.3332132
    p = p * v - 0.49999648
    return v + v * (p * v)


@triton.jit
def softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|), within 2e-6 relative of float64 over fp32's range (torch's
    threshold at 20 changes nothing: there log1p(e^-x) < 2.1e-9 is below half an ulp of x)."""
    return tl.maximum(x, 0.0) + _log1p_unit(_exp_accurate(-tl.abs(x)))


@triton.jit
def affine_combine(a1, b1, a2, b2):
    """Compose h -> a1 h + b1 (earlier in scan order) with h -> a2 h + b2 (later)."""
    return a1 * a2, b1 * a2 + b2


def tensor_strides(x, ndim: int) -> tuple[int, ...]:
    """x.stride(), checked to have ``ndim`` entries (shape errors surface here rather than inside a kernel)."""
    if x.dim() != ndim:
        raise ValueError(f'expected a {ndim}-d tensor, got shape {tuple(x.shape)}')
    return tuple(x.stride())
