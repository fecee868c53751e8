"""Kernels of Vim's causal depthwise conv + silu, both branches in one pass, forward and backward.

Branch 0 is causal, ``a0[t] = b0 + sum_j w0[j] x[t - (W-1) + j]``; branch 1 convolves the reversed sequence
causally, which in natural order is ``a1[t] = b1 + sum_j w1[j] x[t + (W-1) - j]``; ``u_k = silu(a_k)``. One read
of x (its W shifted tiles come from cache) writes both branches, where PyTorch needs a concatenated copy, a grouped
conv, a slice-and-stack copy and a silu pass.

Grid: one program per (token block, channel block, batch element), flat; tiles (BLOCK_D, BLOCK_L); token and
channel offsets times strides are int64. The backward needs the
pre-activation gradient ``ga_k = du_k * silu'(a_k)`` at the W - 1 tokens beyond its tile too; Triton has no register
shift, so those are recomputed from x (W more tile loads per shift, all cache hits) instead of a second kernel and
an fp32 round trip through memory. Weight and bias gradients are per-program fp32 partials summed afterwards
(deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import autotune_configs, silu, silu_grad, tensor_strides

__all__ = ['conv_fwd', 'conv_bwd', 'CONV_BLOCK_L']

# Tokens per program: fixed rather than autotuned, because the backward's partial-sum buffer is sized by it.
CONV_BLOCK_L = 64
# (BLOCK_D, num_warps, num_stages). Every shifted tile costs a 64-bit pointer per element, so tiles stay small per
# thread: at most 8 elements in the forward, 4 in the backward (which recomputes shifted pre-activations), or ptxas
# spills (tests/kernels/test_triton_compile.py).
_FWD_CONFIGS = [(16, 4, 1), (32, 8, 1), (8, 4, 1)]
_BWD_CONFIGS = [(16, 8, 1), (8, 4, 1), (8, 8, 1)]


@triton.jit
def _load_tokens(ptr, s_l, tokens, mask_d, seqlen):
    """(BLOCK_D, BLOCK_L) fp32 tile of rows ``ptr`` (BLOCK_D, 1) at ``tokens`` (BLOCK_L,); zero outside the sequence."""
    ok = mask_d[:, None] & ((tokens >= 0) & (tokens < seqlen))[None, :]
    return tl.load(ptr + tokens.to(tl.int64)[None, :] * s_l, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _preactivation(x_ptr, s_x_l, tokens, mask_d, seqlen, w_ptr, s_w_j, bias, WIDTH: tl.constexpr,
                   REVERSE: tl.constexpr):
    """One branch's conv before silu at ``tokens``: (BLOCK_D, BLOCK_L) fp32. x_ptr, w_ptr: (BLOCK_D, 1) rows;
    bias (BLOCK_D,). REVERSE: branch 1, reading the taps after each token instead of before it."""
    a = tl.zeros((bias.shape[0], tokens.shape[0]), dtype=tl.float32) + bias[:, None]
    for j in tl.static_range(WIDTH):
        w = tl.load(w_ptr + j * s_w_j, mask=mask_d[:, None], other=0.0).to(tl.float32)
        if REVERSE:
            a += w * _load_tokens(x_ptr, s_x_l, tokens + (WIDTH - 1 - j), mask_d, seqlen)
        else:
            a += w * _load_tokens(x_ptr, s_x_l, tokens - (WIDTH - 1 - j), mask_d, seqlen)
    return a


@triton.jit
def _program_tile(seqlen, dim, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's batch element, (batch, token block) index, token and channel offsets, and masks (channels;
    channels x tokens), from a flat grid of (token block, channel block, batch element), batch-major: no 65,535
    limit on the batch."""
    pid = tl.program_id(0).to(tl.int64)
    n_lblocks = tl.cdiv(seqlen, BLOCK_L)
    n_dblocks = tl.cdiv(dim, BLOCK_D)
    lblock = pid % n_lblocks
    b = pid // (n_lblocks * n_dblocks)
    offs_l = lblock.to(tl.int32) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = ((pid // n_lblocks) % n_dblocks).to(tl.int32) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    return b, b * n_lblocks + lblock, offs_l, offs_d, mask_d, mask_d[:, None] & (offs_l < seqlen)[None, :]


@triton.jit
def _load_biases(b_ptr, s_b_k, s_b_d, offs_d, mask_d):
    b0 = tl.load(b_ptr + offs_d * s_b_d, mask=mask_d, other=0.0).to(tl.float32)
    b1 = tl.load(b_ptr + s_b_k + offs_d * s_b_d, mask=mask_d, other=0.0).to(tl.float32)
    return b0, b1


@triton.autotune(configs=autotune_configs(_FWD_CONFIGS), key=['dim', 'WIDTH', 'batch'])
@triton.jit(do_not_specialize=['seqlen'])
def _bidirectional_conv_fwd_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr,
        batch, seqlen, dim,
        s_x_b, s_x_d, s_x_l,
        s_w_k, s_w_d, s_w_j,
        s_b_k, s_b_d,
        WIDTH: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, _, offs_l, offs_d, mask_d, mask = _program_tile(seqlen, dim, BLOCK_L, BLOCK_D)
    x_ptr += b * s_x_b + offs_d.to(tl.int64)[:, None] * s_x_d
    w0_ptr = w_ptr + offs_d[:, None] * s_w_d
    b0, b1 = _load_biases(b_ptr, s_b_k, s_b_d, offs_d, mask_d)
    a0 = _preactivation(x_ptr, s_x_l, offs_l, mask_d, seqlen, w0_ptr, s_w_j, b0, WIDTH, False)
    a1 = _preactivation(x_ptr, s_x_l, offs_l, mask_d, seqlen, w0_ptr + s_w_k, s_w_j, b1, WIDTH, True)

    # out: (batch, seqlen, 2, dim) in memory, channel-contiguous like x
    out_ptr += b * seqlen * 2 * dim + offs_l.to(tl.int64)[None, :] * (2 * dim) + offs_d[:, None]
    tl.store(out_ptr, silu(a0).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + dim, silu(a1).to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=autotune_configs(_BWD_CONFIGS), key=['dim', 'WIDTH', 'batch'])
@triton.jit(do_not_specialize=['seqlen'])
def _bidirectional_conv_bwd_kernel(
        x_ptr, w_ptr, b_ptr, gout_ptr, gx_ptr, gw_ptr, gb_ptr,
        batch, seqlen, dim,
        s_x_b, s_x_d, s_x_l,
        s_w_k, s_w_d, s_w_j,
        s_b_k, s_b_d,
        s_go_b, s_go_k, s_go_d, s_go_l,
        WIDTH: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, b_lblock, offs_l, offs_d, mask_d, mask = _program_tile(seqlen, dim, BLOCK_L, BLOCK_D)
    x_ptr += b * s_x_b + offs_d.to(tl.int64)[:, None] * s_x_d
    gout_ptr += b * s_go_b + offs_d.to(tl.int64)[:, None] * s_go_d
    w0_ptr = w_ptr + offs_d[:, None] * s_w_d
    w1_ptr = w0_ptr + s_w_k
    b0, b1 = _load_biases(b_ptr, s_b_k, s_b_d, offs_d, mask_d)

    # the tile's own pre-activation gradients: bias and weight gradients
    a0 = _preactivation(x_ptr, s_x_l, offs_l, mask_d, seqlen, w0_ptr, s_w_j, b0, WIDTH, False)
    a1 = _preactivation(x_ptr, s_x_l, offs_l, mask_d, seqlen, w1_ptr, s_w_j, b1, WIDTH, True)
    ga0 = _load_tokens(gout_ptr, s_go_l, offs_l, mask_d, seqlen) * silu_grad(a0)
    ga1 = _load_tokens(gout_ptr + s_go_k, s_go_l, offs_l, mask_d, seqlen) * silu_grad(a1)
    # partials: gw (batch, n_blocks_l, 2, dim, WIDTH), gb (batch, n_blocks_l, 2, dim), contiguous fp32
    part = b_lblock * 2 * dim + offs_d
    tl.store(gb_ptr + part, tl.sum(ga0, axis=1), mask=mask_d)
    tl.store(gb_ptr + part + dim, tl.sum(ga1, axis=1), mask=mask_d)
    for j in tl.static_range(WIDTH):
        shift = WIDTH - 1 - j
        x_prev = _load_tokens(x_ptr, s_x_l, offs_l - shift, mask_d, seqlen)
        x_next = _load_tokens(x_ptr, s_x_l, offs_l + shift, mask_d, seqlen)
        tl.store(gw_ptr + part * WIDTH + j, tl.sum(ga0 * x_prev, axis=1), mask=mask_d)
        tl.store(gw_ptr + (part + dim) * WIDTH + j, tl.sum(ga1 * x_next, axis=1), mask=mask_d)

    # gx[t] = sum_j w0[j] ga0[t + shift_j] + w1[j] ga1[t - shift_j]: ga at the shifted tokens is recomputed
    gx = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    for j in tl.static_range(WIDTH):
        shift = WIDTH - 1 - j
        w0 = tl.load(w0_ptr + j * s_w_j, mask=mask_d[:, None], other=0.0).to(tl.float32)
        w1 = tl.load(w1_ptr + j * s_w_j, mask=mask_d[:, None], other=0.0).to(tl.float32)
        if shift == 0:
            gx += w0 * ga0 + w1 * ga1
        else:
            later = offs_l + shift
            earlier = offs_l - shift
            a0s = _preactivation(x_ptr, s_x_l, later, mask_d, seqlen, w0_ptr, s_w_j, b0, WIDTH, False)
            a1s = _preactivation(x_ptr, s_x_l, earlier, mask_d, seqlen, w1_ptr, s_w_j, b1, WIDTH, True)
            g0 = _load_tokens(gout_ptr, s_go_l, later, mask_d, seqlen)
            g1 = _load_tokens(gout_ptr + s_go_k, s_go_l, earlier, mask_d, seqlen)
            gx += w0 * (g0 * silu_grad(a0s)) + w1 * (g1 * silu_grad(a1s))
    tl.store(gx_ptr + b * dim * seqlen + offs_d.to(tl.int64)[:, None] * seqlen + offs_l[None, :],
             gx.to(gx_ptr.dtype.element_ty), mask=mask)


def _grid(seqlen: int, dim: int, batch: int):
    return lambda meta: (triton.cdiv(seqlen, meta['BLOCK_L']) * triton.cdiv(dim, meta['BLOCK_D']) * batch,)


def conv_output(x: torch.Tensor) -> torch.Tensor:
    """The forward's output buffer for x (batch, dim, seqlen): (batch, 2, dim, seqlen), channel-contiguous."""
    batch, dim, seqlen = x.shape
    # torch.empty (not new_empty): the interpreter tests fill it with NaN to catch unwritten outputs
    return torch.empty(batch, seqlen, 2, dim, device=x.device, dtype=x.dtype).permute(0, 2, 3, 1)


def conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (batch, dim, seqlen), weight (2, dim, width), bias (2, dim), any strides -> (batch, 2, dim, seqlen)
    in x's dtype, a view of channel-contiguous (batch, seqlen, 2, dim) memory: the scan, a thread per channel,
    then reads each token's channels as one contiguous run."""
    batch, dim, seqlen = x.shape
    out = conv_output(x)
    _bidirectional_conv_fwd_kernel[_grid(seqlen, dim, batch)](
        x, weight, bias, out, batch, seqlen, dim,
        *tensor_strides(x, 3), *tensor_strides(weight, 3), *tensor_strides(bias, 2),
        WIDTH=weight.shape[2], BLOCK_L=CONV_BLOCK_L,
    )
    return out


def conv_bwd(gout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (x, weight, bias), each in its input's dtype. gout: (batch, 2, dim, seqlen), any strides."""
    batch, dim, seqlen = x.shape
    width = weight.shape[2]
    n_blocks = triton.cdiv(seqlen, CONV_BLOCK_L)
    gx = torch.empty(batch, dim, seqlen, device=x.device, dtype=x.dtype)
    gw = torch.empty(batch, n_blocks, 2, dim, width, device=x.device, dtype=torch.float32)
    gb = torch.empty(batch, n_blocks, 2, dim, device=x.device, dtype=torch.float32)
    _bidirectional_conv_bwd_kernel[_grid(seqlen, dim, batch)](
        x, weight, bias, gout, gx, gw, gb, batch, seqlen, dim,
        *tensor_strides(x, 3), *tensor_strides(weight, 3), *tensor_strides(bias, 2), *tensor_strides(gout, 4),
        WIDTH=width, BLOCK_L=CONV_BLOCK_L,
    )
    return gx, gw.sum((0, 1)).to(weight.dtype), gb.sum((0, 1)).to(bias.dtype)
