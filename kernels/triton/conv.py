"""Kernels of Vim's causal depthwise conv + silu, both branches in one pass, forward and backward.

Branch 0 is causal, ``a0[t] = b0 + sum_j w0[j] x[t - (W-1) + j]``; branch 1 convolves the reversed sequence
causally, which in natural order is ``a1[t] = b1 + sum_j w1[j] x[t + (W-1) - j]``; ``u_k = silu(a_k)``. Written
by distance, ``a0[t] = b0 + sum_s c0[s] x[t - s]`` and ``a1[t] = b1 + sum_s c1[s] x[t + s]`` with the taps
``c_k[s] = w_k[W-1-s]``, s < W <= MAX_WIDTH.

Each thread owns its channels and walks a block of tokens in order, as the scan kernels do, holding the taps and a
sliding window of x (and in the backward of the pre-activation gradients) in registers: per token and channel one
load of x (the forward), of x and the two output gradients (the backward), each used once, and one store per output.
Only tokens at a block's edges are loaded by two blocks (7 of x in the forward; 10 of x and 3 of each output
gradient in the backward, which also takes 3 steps before its loop to fill its window). There are no cross-lane sums (a
channel's weight and bias gradients are sums over its own tokens), and each token's outputs are written once, in
their dtype, channel-contiguous (a warp's store of one token is one contiguous run). The window shifts by one
register per token; unrolling the loop turns most of that shift into register renaming.

Grid: one program per (token block, channel block, batch element), flat (no 65,535 limit on the batch); the block
length ``conv_block_tokens`` fills the GPU's schedulers. Weight and bias gradients are per-program fp32 partials
summed afterwards (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import autotune_configs, silu, silu_grad, tensor_strides
from .fwd import H100_SMS, SUBPARTITIONS_PER_SM, direction_major, sm_count

__all__ = ['conv_fwd', 'conv_bwd', 'conv_output', 'conv_input_grad', 'conv_block_tokens', 'check_width', 'MAX_WIDTH']

# The window holds x at distances -3..3 and the taps c_k[0..3]: widths up to 4 (Vim's and Mamba's 4; causal_conv1d
# takes 2 to 4). A larger width raises a clear error; 'auto' runs the reference for it.
MAX_WIDTH = 4
# (BLOCK_D, num_warps, num_stages, UNROLL): a channel a thread, 1 to 4 warps a program; the loop unrolled by 4
# tokens, so that most of the window's shift is register renaming (sm_90, bf16: the backward issues 103, 90, 78
# and 74 instructions per (token, channel) unrolled by 1, 2, 4 and 8; the forward 49-58 at any). Two channels a
# thread saved nothing and put shuffles or barriers into the remainder loop.
_FWD_CONFIGS = [(32, 1, 1, 4), (64, 2, 1, 4), (128, 4, 1, 4)]
_BWD_CONFIGS = [(32, 1, 1, 4), (64, 2, 1, 4), (128, 4, 1, 4)]
# warps a scheduler should hold so that its issue slots stay busy (the scan's ISSUE_INTERVAL of 6.6 rounded up)
_WARPS_PER_SCHEDULER = 8
_BLOCK_TOKENS = (16, 32, 64, 128, 256)


def conv_block_tokens(batch: int, dim: int, seqlen: int, sms: int = H100_SMS) -> int:
    """Tokens per program: the longest of 16 .. 256 that still gives every scheduler ``_WARPS_PER_SCHEDULER`` warps
    of 32 channels (the shortest where none does). A longer block repeats fewer edge tokens (the backward
    recomputes MAX_WIDTH - 1 of them a block); a shorter one fills more schedulers."""
    target = _WARPS_PER_SCHEDULER * SUBPARTITIONS_PER_SM * sms
    units = batch * triton.cdiv(dim, 32)
    fitting = [n for n in _BLOCK_TOKENS if units * triton.cdiv(seqlen, n) >= target]
    return fitting[-1] if fitting else _BLOCK_TOKENS[0]


@triton.jit
def _program(seqlen, dim, block_l, BLOCK_D: tl.constexpr):
    """(batch element, (batch, token block) index, first token, tokens, channel offsets, channel mask) of this
    program, from a flat grid of (token block, channel block, batch element), batch-major."""
    pid = tl.program_id(0).to(tl.int64)
    n_lblocks = tl.cdiv(seqlen, block_l)
    n_dblocks = tl.cdiv(dim, BLOCK_D)
    lblock = pid % n_lblocks
    b = pid // (n_lblocks * n_dblocks)
    t0 = lblock.to(tl.int32) * block_l
    offs_d = ((pid // n_lblocks) % n_dblocks).to(tl.int32) * BLOCK_D + tl.arange(0, BLOCK_D)
    return b, b * n_lblocks + lblock, t0, tl.minimum(block_l, seqlen - t0), offs_d, offs_d < dim


@triton.jit
def _taps(w_row, s_w_j, mask_d, WIDTH: tl.constexpr):
    """A branch's taps c[0..3] (BLOCK_D,) fp32, c[s] = w[WIDTH - 1 - s]; zero for s >= WIDTH. w_row: (BLOCK_D,)."""
    c0 = tl.load(w_row + (WIDTH - 1) * s_w_j, mask=mask_d, other=0.0).to(tl.float32)
    c1 = tl.zeros_like(c0)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    if WIDTH > 1:
        c1 = tl.load(w_row + (WIDTH - 2) * s_w_j, mask=mask_d, other=0.0).to(tl.float32)
    if WIDTH > 2:
        c2 = tl.load(w_row + (WIDTH - 3) * s_w_j, mask=mask_d, other=0.0).to(tl.float32)
    if WIDTH > 3:
        c3 = tl.load(w_row + (WIDTH - 4) * s_w_j, mask=mask_d, other=0.0).to(tl.float32)
    return c0, c1, c2, c3


@triton.jit
def _load_x(x_row, t, s_x_l, mask_d, seqlen):
    """x (BLOCK_D,) fp32 at token t of the rows ``x_row``; zero outside the sequence (the conv's padding)."""
    return tl.load(x_row + t.to(tl.int64) * s_x_l, mask=mask_d & (t >= 0) & (t < seqlen), other=0.0).to(tl.float32)


@triton.jit
def _parameters(w_ptr, s_w_k, s_w_d, s_w_j, b_ptr, s_b_k, s_b_d, offs_d, mask_d, WIDTH: tl.constexpr):
    """Both branches' taps (``_taps``) and biases, (BLOCK_D,) fp32 each: c00..c03, c10..c13, b0, b1."""
    w_row = w_ptr + offs_d * s_w_d
    c00, c01, c02, c03 = _taps(w_row, s_w_j, mask_d, WIDTH)
    c10, c11, c12, c13 = _taps(w_row + s_w_k, s_w_j, mask_d, WIDTH)
    b0 = tl.load(b_ptr + offs_d * s_b_d, mask=mask_d, other=0.0).to(tl.float32)
    b1 = tl.load(b_ptr + s_b_k + offs_d * s_b_d, mask=mask_d, other=0.0).to(tl.float32)
    return c00, c01, c02, c03, c10, c11, c12, c13, b0, b1


@triton.jit
def _window(x_row, t, s_x_l, mask_d, seqlen):
    """x at tokens t - 3 .. t + 3: the window at token t (the last one is the first iteration's look-ahead)."""
    return (_load_x(x_row, t - 3, s_x_l, mask_d, seqlen), _load_x(x_row, t - 2, s_x_l, mask_d, seqlen),
            _load_x(x_row, t - 1, s_x_l, mask_d, seqlen), _load_x(x_row, t, s_x_l, mask_d, seqlen),
            _load_x(x_row, t + 1, s_x_l, mask_d, seqlen), _load_x(x_row, t + 2, s_x_l, mask_d, seqlen),
            _load_x(x_row, t + 3, s_x_l, mask_d, seqlen))


@triton.autotune(configs=autotune_configs(_FWD_CONFIGS), key=['dim', 'batch', 'block_l', 'WIDTH'])
@triton.jit(do_not_specialize=['seqlen', 'block_l'])
def _bidirectional_conv_fwd_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr,
        batch, seqlen, dim, block_l,
        s_x_b, s_x_d, s_x_l,
        s_w_k, s_w_d, s_w_j,
        s_b_k, s_b_d,
        WIDTH: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr,
):
    b, _, t0, n_tok, offs_d, mask_d = _program(seqlen, dim, block_l, BLOCK_D)
    x_row = x_ptr + b * s_x_b + offs_d.to(tl.int64) * s_x_d
    c00, c01, c02, c03, c10, c11, c12, c13, b0, b1 = _parameters(w_ptr, s_w_k, s_w_d, s_w_j, b_ptr, s_b_k, s_b_d,
                                                                 offs_d, mask_d, WIDTH)
    # the window around token t0 (each iteration then loads one token ahead)
    x_m3, x_m2, x_m1, x_0, x_p1, x_p2, x_next = _window(x_row, t0, s_x_l, mask_d, seqlen)
    x_ahead = x_row + (t0 + 4).to(tl.int64) * s_x_l
    # out: (2, batch, seqlen, dim) in memory (direction-major, channel-contiguous)
    out = out_ptr + (b * seqlen + t0) * dim + offs_d
    branch1 = batch * seqlen.to(tl.int64) * dim
    for i in tl.range(n_tok, loop_unroll_factor=UNROLL):
        x_p3 = x_next
        x_next = tl.load(x_ahead, mask=mask_d & (t0 + i + 4 < seqlen), other=0.0).to(tl.float32)
        x_ahead += s_x_l
        a0 = b0 + c00 * x_0 + c01 * x_m1 + c02 * x_m2 + c03 * x_m3  # from the tokens before t0 + i
        a1 = b1 + c10 * x_0 + c11 * x_p1 + c12 * x_p2 + c13 * x_p3  # and after it
        tl.store(out, silu(a0).to(out_ptr.dtype.element_ty), mask=mask_d)
        tl.store(out + branch1, silu(a1).to(out_ptr.dtype.element_ty), mask=mask_d)
        out += dim
        x_m3, x_m2, x_m1, x_0, x_p1, x_p2 = x_m2, x_m1, x_0, x_p1, x_p2, x_p3


@triton.jit
def _store_partial(ptr, part, WIDTH: tl.constexpr, g0, g1, g2, g3, mask_d):
    """A branch's weight-gradient partials by distance (g_s for tap s) into w's tap order (WIDTH - 1 - s)."""
    tl.store(ptr + part * WIDTH + (WIDTH - 1), g0, mask=mask_d)
    if WIDTH > 1:
        tl.store(ptr + part * WIDTH + (WIDTH - 2), g1, mask=mask_d)
    if WIDTH > 2:
        tl.store(ptr + part * WIDTH + (WIDTH - 3), g2, mask=mask_d)
    if WIDTH > 3:
        tl.store(ptr + part * WIDTH + (WIDTH - 4), g3, mask=mask_d)


@triton.jit
def _grad_step(x_ahead, go0, go1, t, seqlen, s_x_l, s_go_l, mask_d, x_0, x_p1, x_p2, x_next,
               c00, c01, c02, c03, c10, c11, c12, c13, b0, b1):
    """The backward's step at token t: x[t + 3] enters the window from the look-ahead, x[t + 4] is loaded ahead.
    Returns x[t + 3], x[t + 4], the three pointers one token on, ga0[t + 3] and ga1[t] (BLOCK_D,) fp32."""
    x_p3 = x_next
    x_next = tl.load(x_ahead, mask=mask_d & (t + 4 < seqlen), other=0.0).to(tl.float32)
    gout0 = tl.load(go0, mask=mask_d & (t + 3 < seqlen), other=0.0).to(tl.float32)
    gout1 = tl.load(go1, mask=mask_d & (t >= 0), other=0.0).to(tl.float32)
    a0 = b0 + c00 * x_p3 + c01 * x_p2 + c02 * x_p1 + c03 * x_0  # a0 at token t + 3 (the window shifted by 3)
    a1 = b1 + c10 * x_0 + c11 * x_p1 + c12 * x_p2 + c13 * x_p3  # a1 at token t
    return (x_p3, x_next, x_ahead + s_x_l, go0 + s_go_l, go1 + s_go_l, gout0 * silu_grad(a0),
            gout1 * silu_grad(a1))


@triton.autotune(configs=autotune_configs(_BWD_CONFIGS), key=['dim', 'batch', 'block_l', 'WIDTH'])
@triton.jit(do_not_specialize=['seqlen', 'block_l'])
def _bidirectional_conv_bwd_kernel(
        x_ptr, w_ptr, b_ptr, gout_ptr, gx_ptr, gw_ptr, gb_ptr,
        batch, seqlen, dim, block_l,
        s_x_b, s_x_d, s_x_l,
        s_w_k, s_w_d, s_w_j,
        s_b_k, s_b_d,
        s_go_b, s_go_k, s_go_d, s_go_l,
        WIDTH: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr,
):
    # ga_k = gout_k silu'(a_k); gx[t] = sum_s c0[s] ga0[t + s] + c1[s] ga1[t - s]; gw_k by distance s:
    # sum_t ga0[t] x[t - s] and sum_t ga1[t] x[t + s]. Step t loads x[t + 4] (ahead), gout0[t + 3] and gout1[t] and
    # computes ga0[t + 3] and ga1[t]; the window then holds x[t - 3 .. t + 2], ga0[t .. t + 2], ga1[t - 3 .. t - 1].
    # Three steps (tokens t0 - 3 .. t0 - 1) fill it before the loop, whose iteration t writes gx[t].
    b, b_lblock, t0, n_tok, offs_d, mask_d = _program(seqlen, dim, block_l, BLOCK_D)
    x_row = x_ptr + b * s_x_b + offs_d.to(tl.int64) * s_x_d
    c00, c01, c02, c03, c10, c11, c12, c13, b0, b1 = _parameters(w_ptr, s_w_k, s_w_d, s_w_j, b_ptr, s_b_k, s_b_d,
                                                                 offs_d, mask_d, WIDTH)
    ts = t0 - 3
    x_m3, x_m2, x_m1, x_0, x_p1, x_p2, x_next = _window(x_row, ts, s_x_l, mask_d, seqlen)
    x_ahead = x_row + (ts + 4).to(tl.int64) * s_x_l
    go_row = gout_ptr + b * s_go_b + offs_d.to(tl.int64) * s_go_d
    go0 = go_row + (ts + 3).to(tl.int64) * s_go_l
    go1 = go_row + s_go_k + ts.to(tl.int64) * s_go_l
    # Each window value is computed before the loop: Triton carries a variable through a loop only if the loop
    # changes its value object, so a rotation started from one shared zero (g0_0 = g0_1 = zero) would not be
    # carried, and the compiled loop would read zeros where the interpreter reads the window.
    zero = tl.zeros((BLOCK_D,), dtype=tl.float32)
    g0_1, g0_2, g1_m2, g1_m1 = zero, zero, zero, zero  # placeholders, shifted out by the three steps
    for j in tl.static_range(3):
        x_p3, x_next, x_ahead, go0, go1, g0_3, g1_0 = _grad_step(
            x_ahead, go0, go1, ts + j, seqlen, s_x_l, s_go_l, mask_d, x_0, x_p1, x_p2, x_next,
            c00, c01, c02, c03, c10, c11, c12, c13, b0, b1)
        x_m3, x_m2, x_m1, x_0, x_p1, x_p2 = x_m2, x_m1, x_0, x_p1, x_p2, x_p3
        g0_0, g0_1, g0_2 = g0_1, g0_2, g0_3
        g1_m3, g1_m2, g1_m1 = g1_m2, g1_m1, g1_0
    # gx: (batch, seqlen, dim) in memory, channel-contiguous
    gx = gx_ptr + (b * seqlen + t0) * dim + offs_d
    gb0, gw00, gw01, gw02, gw03 = zero, zero, zero, zero, zero  # sums: each gets a new value every iteration
    gb1, gw10, gw11, gw12, gw13 = zero, zero, zero, zero, zero
    for i in tl.range(n_tok, loop_unroll_factor=UNROLL):
        x_p3, x_next, x_ahead, go0, go1, g0_3, g1_0 = _grad_step(
            x_ahead, go0, go1, t0 + i, seqlen, s_x_l, s_go_l, mask_d, x_0, x_p1, x_p2, x_next,
            c00, c01, c02, c03, c10, c11, c12, c13, b0, b1)
        grad = (c00 * g0_0 + c01 * g0_1 + c02 * g0_2 + c03 * g0_3) + (c10 * g1_0 + c11 * g1_m1 + c12 * g1_m2
                                                                       + c13 * g1_m3)
        tl.store(gx, grad.to(gx_ptr.dtype.element_ty), mask=mask_d)
        gx += dim
        gb0 += g0_0
        gw00 += g0_0 * x_0
        gw01 += g0_0 * x_m1
        gw02 += g0_0 * x_m2
        gw03 += g0_0 * x_m3
        gb1 += g1_0
        gw10 += g1_0 * x_0
        gw11 += g1_0 * x_p1
        gw12 += g1_0 * x_p2
        gw13 += g1_0 * x_p3
        x_m3, x_m2, x_m1, x_0, x_p1, x_p2 = x_m2, x_m1, x_0, x_p1, x_p2, x_p3
        g0_0, g0_1, g0_2 = g0_1, g0_2, g0_3
        g1_m3, g1_m2, g1_m1 = g1_m2, g1_m1, g1_0
    # partials: gw (batch, n_blocks_l, 2, dim, WIDTH), gb (batch, n_blocks_l, 2, dim), contiguous fp32
    part = b_lblock * 2 * dim + offs_d
    tl.store(gb_ptr + part, gb0, mask=mask_d)
    tl.store(gb_ptr + part + dim, gb1, mask=mask_d)
    _store_partial(gw_ptr, part, WIDTH, gw00, gw01, gw02, gw03, mask_d)
    _store_partial(gw_ptr, part + dim, WIDTH, gw10, gw11, gw12, gw13, mask_d)


def _grid(seqlen: int, dim: int, batch: int, block_l: int):
    return lambda meta: (triton.cdiv(seqlen, block_l) * triton.cdiv(dim, meta['BLOCK_D']) * batch,)


def conv_output(x: torch.Tensor) -> torch.Tensor:
    """The forward's output buffer for x (batch, dim, seqlen): (batch, 2, dim, seqlen), a view of direction-major
    (2, batch, seqlen, dim) memory (``fwd.direction_major``)."""
    batch, dim, seqlen = x.shape
    # torch.empty inside (not new_empty): the interpreter tests fill it with NaN to catch unwritten outputs
    return direction_major(batch, dim, seqlen, x.device, x.dtype)


def conv_input_grad(x: torch.Tensor) -> torch.Tensor:
    """The backward's buffer for x's gradient: (batch, dim, seqlen) in x's dtype, a transposed view of
    channel-contiguous (batch, seqlen, dim) memory, as the kernel writes it."""
    batch, dim, seqlen = x.shape
    return torch.empty(batch, seqlen, dim, device=x.device, dtype=x.dtype).transpose(1, 2)


def check_width(weight: torch.Tensor) -> int:
    """The conv's width (weight: (2, dim, width)); a clear error above MAX_WIDTH."""
    width = weight.shape[2]
    if width > MAX_WIDTH:
        raise ValueError(f'the Triton conv takes widths up to {MAX_WIDTH} (Vim and Mamba use 4), got {width}: '
                         "use backend='reference' (or 'cpu' on CPU)")
    return width


def conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (batch, dim, seqlen), weight (2, dim, width <= MAX_WIDTH), bias (2, dim), any strides -> (batch, 2, dim,
    seqlen) in x's dtype, a view of direction-major (2, batch, seqlen, dim) memory: the scan, a thread per channel,
    reads each token's channels as one contiguous run, and x_proj reads each branch as one (batch * seqlen, dim)
    matrix in place (``vim.kernels.reference.per_direction_matmul``)."""
    batch, dim, seqlen = x.shape
    width = check_width(weight)
    block_l = conv_block_tokens(batch, dim, seqlen, sm_count(x.device))
    out = conv_output(x)
    _bidirectional_conv_fwd_kernel[_grid(seqlen, dim, batch, block_l)](
        x, weight, bias, out, batch, seqlen, dim, block_l,
        *tensor_strides(x, 3), *tensor_strides(weight, 3), *tensor_strides(bias, 2), WIDTH=width,
    )
    return out


def conv_bwd(gout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (x, weight, bias), each in its input's dtype; x's channel-contiguous (``conv_input_grad``).
    gout: (batch, 2, dim, seqlen), any strides."""
    batch, dim, seqlen = x.shape
    width = check_width(weight)
    block_l = conv_block_tokens(batch, dim, seqlen, sm_count(x.device))
    n_blocks = triton.cdiv(seqlen, block_l)
    gx = conv_input_grad(x)
    gw = torch.empty(batch, n_blocks, 2, dim, width, device=x.device, dtype=torch.float32)
    gb = torch.empty(batch, n_blocks, 2, dim, device=x.device, dtype=torch.float32)
    _bidirectional_conv_bwd_kernel[_grid(seqlen, dim, batch, block_l)](
        x, weight, bias, gout, gx, gw, gb, batch, seqlen, dim, block_l,
        *tensor_strides(x, 3), *tensor_strides(weight, 3), *tensor_strides(bias, 2), *tensor_strides(gout, 4),
        WIDTH=width,
    )
    return gx, gw.sum((0, 1)).to(weight.dtype), gb.sum((0, 1)).to(bias.dtype)
