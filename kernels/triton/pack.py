"""B and C of both directions packed token-major in fp32 for the scan's token loop.

The model's B and C are slices of x_proj's output with tokens contiguous and states ``seqlen`` apart: a token's 16
states would cost the loop 32 scattered 2-byte loads (each with its own 64-bit address and a conversion). Packed as
(batch, 2, seqlen + PACK_PAD, 2 * BLOCK_N) fp32 (B's states, then C's, zero-padded to BLOCK_N), a token's B and C
are 128 contiguous bytes read with 8 vector loads from one address plus constant offsets, already in fp32. The
PACK_PAD tokens past the sequence are zeros, so that the backward reads a chunk's B and C whole, without masks (a
masked load needs its predicate and a zeroed register: ~4 instructions per element in its state loop).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import tensor_strides

__all__ = ['pack_bc', 'PACK_BLOCK_L', 'PACK_PAD']

PACK_BLOCK_L = 64
PACK_PAD = tl.constexpr(8)  # zero tokens after each (batch element, direction)'s sequence: at least a chunk less one


@triton.jit(do_not_specialize=['seqlen'])
def _pack_bc_kernel(B_ptr, C_ptr, bc_ptr, seqlen, dstate,
                    s_B_b, s_B_k, s_B_n, s_B_l, s_C_b, s_C_k, s_C_n, s_C_l,
                    BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = seqlen + PACK_PAD
    n_lblocks = tl.cdiv(rows, BLOCK_L)
    bk = pid // n_lblocks  # batch * 2 + direction
    b = bk // 2
    k = bk % 2
    offs_l = (pid % n_lblocks) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_n = tl.arange(0, BLOCK_N)
    mask_l = offs_l < seqlen
    mask = mask_l[:, None] & (offs_n < dstate)[None, :]
    Bv = tl.load(B_ptr + b * s_B_b + k * s_B_k + offs_n[None, :] * s_B_n + offs_l[:, None] * s_B_l, mask=mask,
                 other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_C_b + k * s_C_k + offs_n[None, :] * s_C_n + offs_l[:, None] * s_C_l, mask=mask,
                 other=0.0).to(tl.float32)
    out = bc_ptr + (bk * rows + offs_l[:, None]) * (2 * BLOCK_N) + offs_n[None, :]
    stored = (offs_l < rows)[:, None]  # the padding too: zeros
    tl.store(out, Bv, mask=stored)
    tl.store(out + BLOCK_N, Cv, mask=stored)


def pack_bc(B: torch.Tensor, C: torch.Tensor, block_n: int) -> torch.Tensor:
    """B, C (batch, 2, dstate, seqlen), any strides -> (batch, 2, seqlen + PACK_PAD, 2 * block_n) fp32, contiguous,
    zeros past seqlen."""
    batch, _, dstate, seqlen = B.shape
    rows = seqlen + PACK_PAD.value
    bc = torch.empty(batch, 2, rows, 2 * block_n, device=B.device, dtype=torch.float32)
    _pack_bc_kernel[(triton.cdiv(rows, PACK_BLOCK_L) * batch * 2,)](
        B, C, bc, seqlen, dstate, *tensor_strides(B, 4), *tensor_strides(C, 4), BLOCK_L=PACK_BLOCK_L,
        BLOCK_N=block_n)
    return bc
