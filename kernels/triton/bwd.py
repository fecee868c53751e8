"""Backward kernel of the fused bidirectional selective scan.

Not yet redesigned like the forward (issue 9; the static report, report.py, predicts it 15-20x above its floor): a
program is one (dim block, direction, batch element) on a flat grid, with (CHUNK, BLOCK_D, BLOCK_N) tiles whose state
axis is spread across lanes. It reads the chunk states the forward stores, (batch, 2, n_chunks - 1, dim, dstate).
A program walks its direction's chunks from the last to the first,
carrying G_next, the gradient of the hidden state at the first position of the chunk after the current one. Per chunk:

1. The chunk is read backwards (addresses only) and the gradient recurrence ``G_t = C_t dy_t + dA_{t+1} G_{t+1}``
   is a plain forward ``tl.associative_scan`` over that tile: the decay at each position is computed from the delta
   of the token after it (one more load), so no shifted register copy and no ``reverse=True`` scan is needed (the
   latter has a history of wrong results for non-commutative combiners in Triton). G is then flipped into scan order.
2. The chunk is read in scan order; its hidden states H are recomputed from the state saved by the forward pass at
   the chunk's start (never stored for every token), and every gradient is formed from G, H and the inputs.
   ``dA_t h_{t-1}`` is taken as ``H_t - dt_t B_t u_t``, so H is never shifted either.

Gradients owned by one program (u, delta) are stored in their input's dtype. Shared ones are reduced in fp32:
A, D and delta_bias through per-batch-element partials summed afterwards, and z by adding the two directions'
halves onto zero (both deterministic); B and C, shared by every dim block, with fp32 atomics, as mamba_ssm does
(summation order, and so the last bits, may vary between runs).
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
    sigmoid,
    silu,
    silu_grad,
    softplus,
    tensor_strides,
)

__all__ = ['scan_bwd']

# (BLOCK_D, num_warps, num_stages). The backward keeps several (CHUNK, BLOCK_D, BLOCK_N) tiles live: at CHUNK 32,
# BLOCK_D 8 needs 8 warps to stay clear of register spills (tests/kernels/test_triton_compile.py).
_CONFIGS = [(8, 8, 1), (4, 4, 1), (4, 8, 1)]


@triton.autotune(configs=autotune_configs(_CONFIGS), key=['dim', 'dstate', 'batch'],
                 reset_to_zero=['gB_ptr', 'gC_ptr', 'gz_ptr'])
@triton.jit(do_not_specialize=['seqlen'])
def _bidirectional_scan_bwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, gout_ptr, states_ptr,
        gu_ptr, gdelta_ptr, gA_ptr, gB_ptr, gC_ptr, gD_ptr, gbias_ptr, gz_ptr,
        batch, seqlen, dim, dstate,
        s_u_b, s_u_k, s_u_d, s_u_l,
        s_dt_b, s_dt_k, s_dt_d, s_dt_l,
        s_A_k, s_A_d, s_A_n,
        s_B_b, s_B_k, s_B_n, s_B_l,
        s_C_b, s_C_k, s_C_n, s_C_l,
        s_D_k, s_D_d,
        s_bias_k, s_bias_d,
        s_z_b, s_z_d, s_z_l,
        s_go_b, s_go_d, s_go_l,
        DELTA_SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    k, b, offs_d, offs_n, mask_d, mask_n, mask_dn = program_slab(dim, dstate, BLOCK_D, BLOCK_N)
    offs_p = tl.arange(0, CHUNK)
    offs_d64 = offs_d.to(tl.int64)  # channel * seqlen may pass 2**31
    u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr = input_rows(
        u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, s_u_b, s_u_k, s_u_d, s_dt_b, s_dt_k, s_dt_d, s_B_b, s_B_k, s_B_n,
        s_C_b, s_C_k, s_C_n, s_z_b, s_z_d, b, k, offs_d, offs_n)
    gout_ptr += b * s_go_b + offs_d.to(tl.int64)[None, :] * s_go_d
    # gradient buffers are contiguous: gu, gdelta (batch, 2, dim, seqlen); gB, gC (batch, 2, dstate, seqlen) fp32;
    # gz (batch, dim, seqlen) fp32; gA (batch, 2, dim, dstate), gD and gbias (batch, 2, dim) fp32 partials
    gu_ptr += (b * 2 + k) * dim * seqlen + offs_d64[None, :] * seqlen
    gdelta_ptr += (b * 2 + k) * dim * seqlen + offs_d64[None, :] * seqlen
    gB_ptr += (b * 2 + k) * dstate * seqlen + offs_n[None, :] * seqlen
    gC_ptr += (b * 2 + k) * dstate * seqlen + offs_n[None, :] * seqlen
    gz_ptr += b * dim * seqlen + offs_d64[None, :] * seqlen

    A, Dk, bias = load_direction_params(A_ptr, D_ptr, bias_ptr, s_A_k, s_A_d, s_A_n, s_D_k, s_D_d, s_bias_k,
                                        s_bias_d, k, offs_d, offs_n, mask_d, mask_dn)

    A2 = A * 1.4426950408889634  # exp(dt A) = exp2(dt A log2 e)
    n_chunks = tl.cdiv(seqlen, CHUNK)
    # states: (batch, 2, n_chunks - 1, dim, dstate), the forward's state after each chunk
    states_ptr += (b * 2 + k) * (n_chunks - 1) * dim * dstate + offs_n[None, :] + offs_d[:, None] * dstate
    first = k * (seqlen - 1)
    step = 1 - 2 * k
    is_first = (offs_p == CHUNK - 1)[:, None, None]  # the chunk's first position, at the end of the reversed tile

    G_next = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # G at the first position of the chunk after this one
    gA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    gD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        # 1. G_t = C_t dy_t + dA_{t+1} G_{t+1} over the chunk read backwards: (CHUNK, BLOCK_D[, BLOCK_N]) tiles
        # whose position p holds scan position c * CHUNK + CHUNK - 1 - p. The decay at p is that of the token
        # after it (one more load of delta, no shifted register copy), so a plain affine scan suffices.
        s = c * CHUNK + (CHUNK - 1 - offs_p)
        tok = (first + step * s)[:, None]
        mask_l = s < seqlen
        mask = mask_l[:, None] & mask_d[None, :]
        mask_next = (s + 1 < seqlen)[:, None] & mask_d[None, :]
        dt_next = tl.load(delta_ptr + (tok + step) * s_dt_l, mask=mask_next, other=0.0).to(tl.float32) + bias[None, :]
        if DELTA_SOFTPLUS:
            dt_next = softplus(dt_next)
        dt_next = tl.where(mask_next, dt_next, 0.0)
        Cc = tl.load(C_ptr + tok * s_C_l, mask=mask_l[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        z = tl.load(z_ptr + tok * s_z_l, mask=mask, other=0.0).to(tl.float32)
        gout = tl.load(gout_ptr + tok * s_go_l, mask=mask, other=0.0).to(tl.float32)
        dy = gout * silu(z) * 0.5  # gradient of this direction's y (before the gate and the average)
        decay, G = tl.associative_scan(
            (tl.exp2(dt_next[:, :, None] * A2[None, :, :]), dy[:, :, None] * Cc[:, None, :]), 0, affine_combine)
        G = decay * G_next[None, :, :] + G  # gradient of the hidden states
        G_next = tl.sum(tl.where(is_first, G, 0.0), axis=0)
        G = tl.flip(G, 0)

        # 2. the chunk in scan order: hidden states recomputed from the saved state at its start, then gradients
        s = c * CHUNK + offs_p
        tok = (first + step * s)[:, None]
        mask_l = s < seqlen
        mask = mask_l[:, None] & mask_d[None, :]
        mask_ln = mask_l[:, None] & mask_n[None, :]
        u = tl.load(u_ptr + tok * s_u_l, mask=mask, other=0.0).to(tl.float32)
        dt_raw = tl.load(delta_ptr + tok * s_dt_l, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
        dt = dt_raw
        if DELTA_SOFTPLUS:
            dt = softplus(dt_raw)
        dt = tl.where(mask, dt, 0.0)
        Bc = tl.load(B_ptr + tok * s_B_l, mask=mask_ln, other=0.0).to(tl.float32)
        Cc = tl.load(C_ptr + tok * s_C_l, mask=mask_ln, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + tok * s_z_l, mask=mask, other=0.0).to(tl.float32)
        gout = tl.load(gout_ptr + tok * s_go_l, mask=mask, other=0.0).to(tl.float32)
        dy = gout * silu(z) * 0.5
        h0 = tl.load(states_ptr + (c - 1).to(tl.int64) * dim * dstate, mask=mask_dn & (c > 0), other=0.0)
        du = dt * u
        decay, H = tl.associative_scan(
            (tl.exp2(dt[:, :, None] * A2[None, :, :]), du[:, :, None] * Bc[:, None, :]), 0, affine_combine)
        H = decay * h0[None, :, :] + H
        y = tl.sum(H * Cc[:, None, :], axis=2) + u * Dk[None, :]
        gC = tl.sum(H * dy[:, :, None], axis=1)
        # G_t * dA_t * h_{t-1}, without shifting H. Exactly 0 at the direction's first token (h_{-1} = 0): on a GPU
        # the subtraction contracts into an FMA and would leave the product's rounding error, all of gA at length 1
        g_log_decay = tl.where((s > 0)[:, None, None], G * (H - du[:, :, None] * Bc[:, None, :]), 0.0)
        gA += tl.sum(g_log_decay * dt[:, :, None], axis=0)
        g_du = tl.sum(G * Bc[:, None, :], axis=2)
        g_dt = g_du * u + tl.sum(g_log_decay * A[None, :, :], axis=2)
        gB = tl.sum(G * du[:, :, None], axis=1)
        if DELTA_SOFTPLUS:
            g_dt = g_dt * sigmoid(dt_raw)
        g_dt = tl.where(mask, g_dt, 0.0)
        gbias += tl.sum(g_dt, axis=0)
        gD += tl.sum(dy * u, axis=0)
        tl.store(gu_ptr + tok, (g_du * dt + dy * Dk[None, :]).to(gu_ptr.dtype.element_ty), mask=mask)
        tl.store(gdelta_ptr + tok, g_dt.to(gdelta_ptr.dtype.element_ty), mask=mask)
        tl.atomic_add(gz_ptr + tok, gout * 0.5 * y * silu_grad(z), mask=mask, sem='relaxed')
        tl.atomic_add(gB_ptr + tok, gB, mask=mask_ln, sem='relaxed')
        tl.atomic_add(gC_ptr + tok, gC, mask=mask_ln, sem='relaxed')

    part = (b * 2 + k) * dim + offs_d
    tl.store(gA_ptr + part[:, None] * dstate + offs_n[None, :], gA, mask=mask_dn)
    tl.store(gD_ptr + part, gD, mask=mask_d)
    tl.store(gbias_ptr + part, gbias, mask=mask_d)


def scan_bwd(
        gout: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
        C: torch.Tensor, D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, states: torch.Tensor,
        delta_softplus: bool, chunk: int,
) -> tuple[torch.Tensor, ...]:
    """Launch the backward kernel. Returns the gradients of (u, delta, A, B, C, D, z, delta_bias), each in the
    dtype of its input."""
    batch, _, dim, seqlen = u.shape
    dstate = A.shape[-1]
    dev = u.device
    gu = torch.empty(batch, 2, dim, seqlen, device=dev, dtype=u.dtype)
    gdelta = torch.empty(batch, 2, dim, seqlen, device=dev, dtype=delta.dtype)
    gB = torch.zeros(batch, 2, dstate, seqlen, device=dev, dtype=torch.float32)
    gC = torch.zeros(batch, 2, dstate, seqlen, device=dev, dtype=torch.float32)
    gz = torch.zeros(batch, dim, seqlen, device=dev, dtype=torch.float32)
    gA = torch.empty(batch, 2, dim, dstate, device=dev, dtype=torch.float32)
    gD = torch.empty(batch, 2, dim, device=dev, dtype=torch.float32)
    gbias = torch.empty(batch, 2, dim, device=dev, dtype=torch.float32)
    # flat grid: programs (channel block, direction, batch element), batch-major (no 65,535 limit on batch)
    grid = lambda meta: (triton.cdiv(dim, meta['BLOCK_D']) * 2 * batch,)  # noqa: E731
    _bidirectional_scan_bwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, gout, states,
        gu, gdelta, gA, gB, gC, gD, gbias, gz,
        batch, seqlen, dim, dstate,
        *tensor_strides(u, 4), *tensor_strides(delta, 4), *tensor_strides(A, 3),
        *tensor_strides(B, 4), *tensor_strides(C, 4), *tensor_strides(D, 2), *tensor_strides(delta_bias, 2),
        *tensor_strides(z, 3), *tensor_strides(gout, 3),
        DELTA_SOFTPLUS=delta_softplus, CHUNK=chunk, BLOCK_N=triton.next_power_of_2(dstate),
    )
    return (gu, gdelta, gA.sum(0).to(A.dtype), gB.to(B.dtype), gC.to(C.dtype), gD.sum(0).to(D.dtype),
            gz.to(z.dtype), gbias.sum(0).to(delta_bias.dtype))
