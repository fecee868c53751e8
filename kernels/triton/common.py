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


@triton.jit
def program_slab(dim, dstate, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The scan kernels' program (dim block, direction, batch element): direction k (0 scans first token to last,
    1 last to first), batch element b, channel and state offsets, and their masks."""
    k = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
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
    return (u_ptr + b * s_u_b + k * s_u_k + offs_d[None, :] * s_u_d,
            delta_ptr + b * s_dt_b + k * s_dt_k + offs_d[None, :] * s_dt_d,
            B_ptr + b * s_B_b + k * s_B_k + offs_n[None, :] * s_B_n,
            C_ptr + b * s_C_b + k * s_C_k + offs_n[None, :] * s_C_n,
            z_ptr + b * s_z_b + offs_d[None, :] * s_z_d)


def tensor_strides(x, ndim: int) -> tuple[int, ...]:
    """x.stride(), checked to have ``ndim`` entries (shape errors surface here rather than inside a kernel)."""
    if x.dim() != ndim:
        raise ValueError(f'expected a {ndim}-d tensor, got shape {tuple(x.shape)}')
    return tuple(x.stride())
