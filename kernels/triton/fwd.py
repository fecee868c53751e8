"""Forward kernel of the fused bidirectional selective scan.

Grid: one program per (dim block, direction, batch element). A program walks its direction's scan order in chunks of
CHUNK tokens. Each chunk is loaded as (CHUNK, BLOCK_D) / (CHUNK, BLOCK_N) tiles, the backward direction reading its
chunk at decreasing token indices (the sequence is reversed by address arithmetic, never copied); the tiles are
discretised in registers into a (CHUNK, BLOCK_D, BLOCK_N) tile of decays exp(dt A) and inputs dt B u and scanned
along the chunk with ``tl.associative_scan``, seeded by the (BLOCK_D, BLOCK_N) state carried in registers from the
previous chunk. Position is the tile's first axis, so each thread holds whole columns of the chunk and the scan runs
inside a thread, with no shuffles.

Each direction adds ``y * silu(z) / 2`` into one fp32 output: two addends onto zero, so the sum is exact and
independent of their order (deterministic). When a backward pass will follow, the state after each chunk is stored;
the backward kernel recomputes the hidden states inside a chunk from it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    affine_combine,
    autotune_configs,
    input_rows,
    load_direction_params,
    program_slab,
    silu,
    softplus,
    tensor_strides,
)

__all__ = ['scan_fwd']

# (BLOCK_D, num_warps, num_stages). A (32, 8, 16) fp32 tile is 32 registers a thread at 4 warps; all compile for
# sm_90 without spills (tests/kernels/test_triton_compile.py).
_CONFIGS = [(8, 4, 1), (4, 4, 1), (8, 8, 1), (16, 8, 1)]


@triton.autotune(configs=autotune_configs(_CONFIGS), key=['dim', 'dstate'], reset_to_zero=['out_ptr'])
@triton.jit(do_not_specialize=['seqlen'])
def _bidirectional_scan_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, states_ptr,
        seqlen, dim, dstate,
        s_u_b, s_u_k, s_u_d, s_u_l,
        s_dt_b, s_dt_k, s_dt_d, s_dt_l,
        s_A_k, s_A_d, s_A_n,
        s_B_b, s_B_k, s_B_n, s_B_l,
        s_C_b, s_C_k, s_C_n, s_C_l,
        s_D_k, s_D_d,
        s_bias_k, s_bias_d,
        s_z_b, s_z_d, s_z_l,
        DELTA_SOFTPLUS: tl.constexpr, STORE_STATES: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
):
    k, b, offs_d, offs_n, mask_d, mask_n, mask_dn = program_slab(dim, dstate, BLOCK_D, BLOCK_N)
    offs_p = tl.arange(0, CHUNK)
    u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr = input_rows(
        u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, s_u_b, s_u_k, s_u_d, s_dt_b, s_dt_k, s_dt_d, s_B_b, s_B_k, s_B_n,
        s_C_b, s_C_k, s_C_n, s_z_b, s_z_d, b, k, offs_d, offs_n)
    out_ptr += b * dim * seqlen + offs_d[None, :] * seqlen

    A, Dk, bias = load_direction_params(A_ptr, D_ptr, bias_ptr, s_A_k, s_A_d, s_A_n, s_D_k, s_D_d, s_bias_k,
                                        s_bias_d, k, offs_d, offs_n, mask_d, mask_dn)

    n_chunks = tl.cdiv(seqlen, CHUNK)
    # states: (batch, 2, n_chunks - 1, dim, dstate), the state after each chunk but the last
    states_ptr += (b * 2 + k) * (n_chunks - 1) * dim * dstate + offs_d[:, None] * dstate + offs_n[None, :]
    # token index of scan position s: s forwards, seqlen - 1 - s backwards
    first = k * (seqlen - 1)
    step = 1 - 2 * k
    is_last = (offs_p == CHUNK - 1)[:, None, None]

    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for c in range(n_chunks):
        # tiles are (CHUNK, BLOCK_D[, BLOCK_N]), position first: the scan then runs inside each thread
        s = c * CHUNK + offs_p
        mask_l = s < seqlen
        tok = (first + step * s)[:, None]
        mask = mask_l[:, None] & mask_d[None, :]
        mask_ln = mask_l[:, None] & mask_n[None, :]
        # upcast right after each load: everything below is fp32
        u = tl.load(u_ptr + tok * s_u_l, mask=mask, other=0.0).to(tl.float32)
        dt = tl.load(delta_ptr + tok * s_dt_l, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
        if DELTA_SOFTPLUS:
            dt = softplus(dt)
        dt = tl.where(mask, dt, 0.0)  # padding then has decay 1 and input 0: the state passes through unchanged
        Bc = tl.load(B_ptr + tok * s_B_l, mask=mask_ln, other=0.0).to(tl.float32)
        Cc = tl.load(C_ptr + tok * s_C_l, mask=mask_ln, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + tok * s_z_l, mask=mask, other=0.0).to(tl.float32)

        decay = tl.exp(dt[:, :, None] * A[None, :, :])  # (CHUNK, BLOCK_D, BLOCK_N)
        inp = (dt * u)[:, :, None] * Bc[:, None, :]
        decay, inp = tl.associative_scan((decay, inp), 0, affine_combine)
        H = decay * h[None, :, :] + inp  # hidden states of the chunk
        y = tl.sum(H * Cc[:, None, :], axis=2) + u * Dk[None, :]
        tl.atomic_add(out_ptr + tok, y * silu(z) * 0.5, mask=mask, sem='relaxed')

        h = tl.sum(tl.where(is_last, H, 0.0), axis=0)
        if STORE_STATES:
            tl.store(states_ptr + c * dim * dstate, h, mask=mask_dn & (c < n_chunks - 1))


def scan_fwd(
        u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, delta_softplus: bool, chunk: int,
        store_states: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel. Shapes as ``bidirectional_scan_ref``; inputs may be strided views.

    Returns:
        out: (batch, dim, seqlen) fp32. states: (batch, 2, n_chunks - 1, dim, dstate) fp32, the state after each
        chunk but the last, in each direction's own scan order; None unless ``store_states`` (inference needs none).
    """
    batch, _, dim, seqlen = u.shape
    dstate = A.shape[-1]
    n_chunks = triton.cdiv(seqlen, chunk)
    out = torch.zeros(batch, dim, seqlen, device=u.device, dtype=torch.float32)
    states = torch.empty(batch, 2, n_chunks - 1 if store_states else 0, dim, dstate, device=u.device,
                         dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(dim, meta['BLOCK_D']), 2, batch)  # noqa: E731
    _bidirectional_scan_fwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, out, states,
        seqlen, dim, dstate,
        *tensor_strides(u, 4), *tensor_strides(delta, 4), *tensor_strides(A, 3),
        *tensor_strides(B, 4), *tensor_strides(C, 4), *tensor_strides(D, 2), *tensor_strides(delta_bias, 2),
        *tensor_strides(z, 3),
        DELTA_SOFTPLUS=delta_softplus, STORE_STATES=store_states, CHUNK=chunk,
        BLOCK_N=triton.next_power_of_2(dstate),
    )
    return out, states if store_states else None
