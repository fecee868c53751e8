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
def _exp_accurate(x):
    """e^x for x <= 0 to a few fp32 ulp on the GPU too: ``tl.exp`` there is ex2.approx(x * log2 e), whose rounded
    product loses up to 1.3e-6 relative at |x| = 30; the product's rounding error is added back to first order."""
    t = x * 1.4426950408889634
    r = tl.fma(x, 1.4426950408889634, -t) + x * 2.0355273740931033e-08  # x*log2(e) - t, log2(e)'s low part too
    return tl.exp2(t) * (1.0 + r * 0.6931471805599453)


@triton.jit
def _log1p_unit(v):
    """log(1 + v) for v in [0, 1], to a few fp32 ulp: 2 atanh(s) with s = v / (2 + v) in [0, 1/3], its odd series
    to s^17 (truncation below 1e-8 relative). ``log(1 + v)`` would lose v's low bits to the rounding of 1 + v."""
    s = v / (2.0 + v)
    s2 = s * s
    p = 1.0 / 17.0
    p = p * s2 + 1.0 / 15.0
    p = p * s2 + 1.0 / 13.0
    p = p * s2 + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    return 2.0 * s * (1.0 + s2 * p)


@triton.jit
def softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|), within 2e-6 relative of float64 over fp32's range (torch's
    threshold at 20 changes nothing: there log1p(e^-x) < 2.1e-9 is below half an ulp of x)."""
    return tl.maximum(x, 0.0) + _log1p_unit(_exp_accurate(-tl.abs(x)))


@triton.jit
def affine_combine(a1, b1, a2, b2):
    """Compose h -> a1 h + b1 (earlier in scan order) with h -> a2 h + b2 (later)."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def program_slab(dim, dstate, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The backward kernel's program (dim block, direction, batch element) from a flat grid (batch may exceed the
    65,535 programs of grid axes 1 and 2): direction k (0 scans first token to last, 1 last to first), batch
    element b, channel and state offsets, and their masks."""
    pid = tl.program_id(0).to(tl.int64)
    n_dblocks = tl.cdiv(dim, BLOCK_D)
    k = (pid // n_dblocks) % 2
    b = pid // (2 * n_dblocks)
    offs_d = (pid % n_dblocks).to(tl.int32) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    return k, b, offs_d, offs_n, mask_d, mask_n, mask_d[:, None] & mask_n[None, :]


@triton.jit
def load_direction_params(A_ptr, D_ptr, bias_ptr, s_A_k, s_A_d, s_A_n, s_D_k, s_D_d, s_bias_k, s_bias_d,
                          k, offs_d, offs_n, mask_d, mask_dn):
    """Direction k's A (BLOCK_D, BLOCK_N), D and delta bias (BLOCK_D,), in fp32."""
    A = tl.load(A_ptr + k * s_A_k + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n, mask=mask_dn,
                other=0.0).to(tl.float32)
    Dk = tl.load(D_ptr + k * s_D_k + offs_d * s_D_d, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + k * s_bias_k + offs_d * s_bias_d, mask=mask_d, other=0.0).to(tl.float32)
    return A, Dk, bias


@triton.jit
def input_rows(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, s_u_b, s_u_k, s_u_d, s_dt_b, s_dt_k, s_dt_d,
               s_B_b, s_B_k, s_B_n, s_C_b, s_C_k, s_C_n, s_z_b, s_z_d, b, k, offs_d, offs_n):
    """Pointers to this program's rows of u, delta, z (1, BLOCK_D) and B, C (1, BLOCK_N); add token * stride."""
    return (u_ptr + b * s_u_b + k * s_u_k + offs_d.to(tl.int64)[None, :] * s_u_d,
            delta_ptr + b * s_dt_b + k * s_dt_k + offs_d.to(tl.int64)[None, :] * s_dt_d,
            B_ptr + b * s_B_b + k * s_B_k + offs_n[None, :] * s_B_n,
            C_ptr + b * s_C_b + k * s_C_k + offs_n[None, :] * s_C_n,
            z_ptr + b * s_z_b + offs_d.to(tl.int64)[None, :] * s_z_d)


def tensor_strides(x, ndim: int) -> tuple[int, ...]:
    """x.stride(), checked to have ``ndim`` entries (shape errors surface here rather than inside a kernel)."""
    if x.dim() != ndim:
        raise ValueError(f'expected a {ndim}-d tensor, got shape {tuple(x.shape)}')
    return tuple(x.stride())
