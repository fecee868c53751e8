"""Backward pass of the fused bidirectional selective scan: a thread owns a channel, a chunk of its tokens in its own
registers, and walks the states one at a time.

The main kernel, ``_bidirectional_scan_bwd_kernel``, is one program per (channel block, segment, batch element),
``BLOCK_D = 32 x num_warps`` channels, one a thread, over the segment's chunks of CHUNK tokens in reverse scan order.
It is launched once per direction (``K``, a compile-time constant): one kernel holding both
directions took 80-98 s to compile for sm_90 (95% in Triton's coalescing pass, whose cost grows faster than the
kernel) at 255 registers; one direction takes 22-31 s (triton 3.8 / 3.6, before the gB/gC reduce-scatter below).
Per chunk it loads the (CHUNK, BLOCK_D) tiles of dt (softplus once per token), dt u and dy (the CHUNK axis inside
each thread), then loops over the states n; per state, with ``a_t = exp2(dt_t A_n log2 e)`` computed once per
(token, channel, state):

- ``h_t = a_t h_{t-1} + dt_t u_t B_t`` from the state the forward saved at the chunk's start, and
  ``g_t = C_t dy_t + a_{t+1} g_{t+1}`` (the state's gradient) from the later chunk's ``a g`` at its first position,
  position by position inside the thread (unrolled over the chunk): the decay is shared by both, the shift by one
  token is a register pick, nothing is flipped and no scan op is used (Triton lowers ``associative_scan(...,
  reverse=True)`` with lane shuffles even along an in-thread axis);
- per (token, channel), summed over n in registers: ``g B`` (u's gradient) and ``g a h_{t-1} A`` with
  ``a h_{t-1}`` kept from the recompute (delta's gradient);
  per (channel, state), summed over tokens: ``g a h_{t-1} dt`` (A's gradient);
- per (token, state), summed over channels: ``g dt u`` (B) and ``h dy`` (C). These are the loop's only cross-lane
  work: the chunk's 2 CHUNK sums are reduced together by a reduce-scatter over the warp's lanes (a level exchanges
  half of the values still held, one SHFL each: 2 CHUNK SHFL a state iteration where a 5-level butterfly per sum
  took 10 CHUNK), which leaves each sum in its own lane; one store writes the warp's fp32 partial sums, and a torch
  sum over channel groups follows.

Chunks are token ranges ``[c CHUNK, (c + 1) CHUNK)`` in both directions (direction 1 reads its chunk backwards), and
the forward saves each direction's state at every chunk boundary (fwd.py), so a chunk's start state is one load.

To fill the GPU at small batch the sequence is split into segments of whole chunks (``plan_backward_segments``),
as the forward does; the gradient recurrence is linear in the carry, so the same three-pass scheme applies:

1. ``_segment_carry_kernel``: per (channel block, direction, batch element, segment) the carry ``a g`` at the
   segment's first position in scan order from a zero carry at its end, walked with the state in registers (the
   forward's token loop, one exp2 per element), and the segment's sum of dt;
2. the forward's ``_segment_boundary_kernel`` with ``REVERSE``: the true carry into each segment, in place;
3. the main kernel, starting each direction from its segment's carry.

The per-(state, channel) carry between chunks and gA live in private fp32 rows that the same thread writes at the
first chunk it walks before any read, so the autotuner's repeated runs stay idempotent. The gate's gradient needs
both directions' ungated y: the forward saves their sum (``ysum``, as mamba_ssm saves its ungated output), and a
small elementwise kernel, ``_gate_grad_kernel``, writes gz from it. Recomputing y here cost an FMA per element, a
(CHUNK,) tile of registers live across the state loop, and a direction-1 row read back by direction 0, whose loads
in the epilogue held the register peak that kept a scheduler at 2 warps. The gradients of u, delta and z are
written once, in their input's dtype, channel-contiguous (a warp's store of a token is one run); A, D and
delta_bias are reduced per (batch element, segment) and summed afterwards. No memset, no atomics, no flips. Token
offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import autotune_configs, pick, sigmoid, silu, silu_grad, tensor_strides
from .fwd import (
    H100_SMS,
    _channels,
    _packed,
    _packed_rows,
    _params,
    _segment_boundary_kernel,
    _side_program,
    _step_dt,
    _store_groups,
    _zero_groups,
    channel_contiguous,
    direction_major,
    plan_split,
    sm_count,
)
from .pack import PACK_PAD, pack_bc

__all__ = ['scan_bwd', 'plan_backward_segments', 'within_chunk_offsets', 'bc_grad']

# (BLOCK_D, num_warps, num_stages): one channel a thread, one warp a program. With several warps the per-warp gB/gC
# partials, a (BLOCK_D // 32,) vector spread over warps, reach their store through shared memory: 32 BAR and 32
# STS/LDS per state iteration (static report, Triton 3.6 and 3.8). MAX_REGISTERS caps ptxas: left to itself it took
# 241-255 registers (2 warps a scheduler), most of them for loads hoisted in the chunk loop's prologue and epilogue;
# the state loop fits in fewer, and at 168 a scheduler holds 3 warps (65,536 / (168 x 32) = 12 an SM). With the
# gate's gradient moved out (_gate_grad_kernel) nothing spills at that cap (test_triton_compile).
MAX_REGISTERS = 168
GATE_BLOCK_L, GATE_BLOCK_D, GATE_WARPS = 32, 64, 4  # _gate_grad_kernel's tile of (token, channel) and its warps
_CONFIGS = [triton.Config({'BLOCK_D': 32}, num_warps=1, num_stages=1, maxnreg=MAX_REGISTERS)]
_CARRY_CONFIGS = [(64, 2, 1), (32, 1, 1), (128, 4, 1)]
LN2 = tl.constexpr(0.6931471805599453)

# Channel and token strides are runtime values (see fwd._CHANNEL_STRIDES): a stride specialised to 1 would let
# Triton vectorise along it and give that load a layout other than the loop's. s_c_d and s_g_d are the channel
# strides (1) of the kernel's own rows: carry and gA, and the gradients.
_STRIDES = ['s_u_d', 's_u_l', 's_dt_d', 's_dt_l', 's_A_d', 's_A_n', 's_D_d', 's_bias_d', 's_z_d', 's_z_l', 's_go_d',
            's_go_l', 's_c_d', 's_g_d']

# The segment plan's weights (fwd.plan_split), relative to the forward's output pass per token and direction: the
# main kernel issues ~3x its instructions per element (35-36.5 against 11-13, static report), the carry pass about
# as many as the forward's state pass. RESIDENT_*: warps a scheduler holds (static report: the main kernel capped at
# MAX_REGISTERS, 3 in both directions; the carry pass at 72 registers, 0.44).
_MAIN_COST = 3.0
_CARRY_COST = 0.8
RESIDENT_MAIN = 3
RESIDENT_CARRY = 7


def plan_backward_segments(batch: int, dim: int, seqlen: int, chunk: int, sms: int = H100_SMS) -> tuple[int, int]:
    """(segment length, a multiple of ``chunk``; number of segments) for the backward's sequence split: the plan of
    least modelled issue time (``fwd.plan_split``) with the main kernel's and the carry pass's weights."""
    return plan_split(batch, dim, seqlen, chunk, sms, _MAIN_COST, RESIDENT_MAIN, _CARRY_COST, RESIDENT_CARRY)


@triton.autotune(configs=autotune_configs(_CARRY_CONFIGS), key=['dim', 'dstate', 'batch', 'n_seg'])
@triton.jit(do_not_specialize=['seqlen', 'seg_len', 'n_seg', *_STRIDES])
def _segment_carry_kernel(
        delta_ptr, A_ptr, bc_ptr, z_ptr, bias_ptr, gout_ptr, rseg_ptr, dtsum_ptr,
        batch, seqlen, dim, dstate, seg_len, n_seg, s_h_n, s_h_d,
        s_dt_b, s_dt_k, s_dt_d, s_dt_l,
        s_A_k, s_A_d, s_A_n,
        s_bias_k, s_bias_d,
        s_z_b, s_z_d, s_z_l,
        s_go_b, s_go_d, s_go_l,
        DELTA_SOFTPLUS: tl.constexpr, BLOCK_N: tl.constexpr, STATE_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # entry e is segment e + 1 (direction 0) or e (1): not the first of each scan order
    N_GROUPS: tl.constexpr = BLOCK_N // STATE_J
    e, bk, b, k, offs_d, mask_d = _side_program(dim, n_seg, BLOCK_D)
    A0, A1, A2, A3, _, bias = _params(A_ptr, A_ptr, bias_ptr, s_A_k, s_A_d, s_A_n, 0, 0, s_bias_k, s_bias_d, k,
                                      dstate, offs_d, mask_d, STATE_J, N_GROUPS, BLOCK_D)
    d64 = offs_d.to(tl.int64)
    dt_row = delta_ptr + b * s_dt_b + k * s_dt_k + d64 * s_dt_d
    z_row = z_ptr + b * s_z_b + d64 * s_z_d
    go_row = gout_ptr + b * s_go_b + d64 * s_go_d
    C_row = _packed_rows(bc_ptr, bk, seqlen, offs_d, STATE_J, BLOCK_N) + BLOCK_N
    seg = e + 1 - k
    t_lo = seg * seg_len
    n_tok = tl.minimum(seqlen - t_lo, seg_len)
    # reverse scan order: direction 0 from the segment's last token down, direction 1 from its first up
    first = t_lo + (1 - k) * (n_tok - 1)
    step = 2 * k - 1

    r0, r1, r2, r3 = _zero_groups(STATE_J, BLOCK_D)
    dtsum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dt_n = tl.load(dt_row + first * s_dt_l, mask=mask_d, other=0.0)
    z_n = tl.load(z_row + first * s_z_l, mask=mask_d, other=0.0)
    go_n = tl.load(go_row + first * s_go_l, mask=mask_d, other=0.0)
    C0n, C1n, C2n, C3n = _packed(C_row + first * (2 * BLOCK_N), STATE_J, N_GROUPS)
    for i in range(n_tok):
        dt_raw, z, go, C0, C1, C2, C3 = dt_n, z_n, go_n, C0n, C1n, C2n, C3n
        t_next = first + step * tl.minimum(i + 1, n_tok - 1)  # the last iteration re-reads its own token
        dt_n = tl.load(dt_row + t_next * s_dt_l, mask=mask_d, other=0.0)
        z_n = tl.load(z_row + t_next * s_z_l, mask=mask_d, other=0.0)
        go_n = tl.load(go_row + t_next * s_go_l, mask=mask_d, other=0.0)
        C0n, C1n, C2n, C3n = _packed(C_row + t_next * (2 * BLOCK_N), STATE_J, N_GROUPS)
        dt = _step_dt(dt_raw, bias, mask_d, DELTA_SOFTPLUS)
        dtsum += dt
        dy = (go.to(tl.float32) * silu(z.to(tl.float32)) * 0.5)[None, :]
        dt2 = dt[None, :]
        # g_t = C_t dy_t + r, then r = a_t g_t: the carry to the position before
        r0 = tl.exp2(dt2 * A0) * (r0 + dy * C0)
        if N_GROUPS > 1:
            r1 = tl.exp2(dt2 * A1) * (r1 + dy * C1)
        if N_GROUPS > 2:
            r2 = tl.exp2(dt2 * A2) * (r2 + dy * C2)
            r3 = tl.exp2(dt2 * A3) * (r3 + dy * C3)

    # rseg: (batch, 2, n_seg - 1, dim, dstate) fp32; dtsum: (batch, 2, n_seg - 1, dim) fp32
    row = (bk * (n_seg - 1) + e) * dim
    _store_groups(rseg_ptr + row * dstate, s_h_n, s_h_d, r0, r1, r2, r3, dstate, offs_d, mask_d, STATE_J, N_GROUPS)
    tl.store(dtsum_ptr + row + offs_d, dtsum, mask=mask_d)


@triton.jit(do_not_specialize=['seqlen'])
def _gate_grad_kernel(y_ptr, z_ptr, gout_ptr, gz_ptr, seqlen, dim, s_z_b, s_z_d, s_z_l, s_go_b, s_go_d, s_go_l,
                      BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """gz = gout (y_0 + y_1) silu'(z) / 2 on a (BLOCK_L, BLOCK_D) tile of (token, channel), from the forward's
    ungated sum ``ysum``: ysum and gz channel-contiguous (batch, seqlen, dim) memory, each in its own dtype."""
    pid = tl.program_id(0).to(tl.int64)
    n_dblocks = tl.cdiv(dim, BLOCK_D)
    n_lblocks = tl.cdiv(seqlen, BLOCK_L)
    b = pid // (n_dblocks * n_lblocks)
    offs_l = ((pid // n_dblocks) % n_lblocks) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = (pid % n_dblocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (offs_l < seqlen)[:, None] & (offs_d < dim)[None, :]
    rows = (b * seqlen + offs_l[:, None]) * dim + offs_d[None, :]
    y = tl.load(y_ptr + rows, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + b * s_z_b + offs_d[None, :] * s_z_d + offs_l[:, None] * s_z_l, mask=mask,
                other=0.0).to(tl.float32)
    go = tl.load(gout_ptr + b * s_go_b + offs_d[None, :] * s_go_d + offs_l[:, None] * s_go_l, mask=mask,
                 other=0.0).to(tl.float32)
    tl.store(gz_ptr + rows, (go * 0.5 * y * silu_grad(z)).to(gz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _put(X, p, i, x):
    """X with row i replaced by the vector x (BLOCK_D,): a register write."""
    return tl.where(p == i, x[None, :], X)


@triton.jit
def _dt_grad(dt_raw, dt, DELTA_SOFTPLUS: tl.constexpr):
    """d dt / d (delta + bias): sigmoid(x) = exp(x - softplus(x)), one exp2 from the dt already computed (accurate:
    the argument's error is that of x, and it is <= 0)."""
    if DELTA_SOFTPLUS:
        return tl.exp2((dt_raw - dt) * 1.4426950408889634)
    return tl.full(dt_raw.shape, 1.0, tl.float32)


@triton.jit
def _exchange(a, b, lane, m: tl.constexpr):
    """One level of a warp's reduce-scatter: lanes with bit ``m`` clear keep a and receive their partner's a (lane
    ^ m), the others keep b and receive b; each returns its kept value plus the received one. A single SHFL
    (``tl.gather`` along one warp's lanes), where summing a and b each over the pair would take two."""
    bit = (lane & m) != 0
    return tl.where(bit, b, a) + tl.gather(tl.where(bit, a, b), lane ^ m, 0)


@triton.jit
def _load(row, tok, stride, mask):
    return tl.load(row + tok * stride, mask=mask, other=0.0).to(tl.float32)


# Every load and store is a (BLOCK_D,) vector of one token (the gB/gC partials: one (token, state) sum a lane): a 2-D
# (CHUNK, BLOCK_D) memory op with runtime strides on both axes ties its axes' contiguity, and Triton 3.6 breaks the
# tie towards the token axis, laying lanes over tokens and the whole state loop out with shuffles and barriers (the
# static report compiled with 3.6 showed 426 SHFL and 19-43 BAR per state iteration; 3.8 broke it the other way).
# The (CHUNK, BLOCK_D) tiles only hold a chunk's per-token vectors in registers (_put, common.pick: compile-time picks).
@triton.autotune(configs=autotune_configs(_CONFIGS), key=['dim', 'dstate', 'batch', 'n_seg'])
@triton.jit(do_not_specialize=['batch', 'dim', 'dstate', 'seqlen', 'seg_len', 'n_seg', *_STRIDES])
def _bidirectional_scan_bwd_kernel(
        u_ptr, delta_ptr, A_ptr, bc_ptr, D_ptr, z_ptr, bias_ptr, gout_ptr, states_ptr, rseg_ptr, carry_ptr,
        gu_ptr, gdelta_ptr, gbc_ptr, gD_ptr, gbias_ptr,
        batch, seqlen, dim, dstate, seg_len, n_seg, s_h_n, s_h_d, s_c_d, s_g_d,
        s_u_b, s_u_k, s_u_d, s_u_l,
        s_dt_b, s_dt_k, s_dt_d, s_dt_l,
        s_A_k, s_A_d, s_A_n,
        s_D_k, s_D_d,
        s_bias_k, s_bias_d,
        s_z_b, s_z_d, s_z_l,
        s_go_b, s_go_d, s_go_l,
        DELTA_SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr,
        BLOCK_D: tl.constexpr,
):
    # program -> (channel block, segment, batch element)
    pid = tl.program_id(0).to(tl.int64)
    n_dblocks = tl.cdiv(dim, BLOCK_D)
    seg = (pid // n_dblocks) % n_seg
    b = pid // (n_dblocks * n_seg)
    offs_d, mask_d = _channels(pid, n_dblocks, dim, BLOCK_D)
    tl.static_assert(BLOCK_D == 32, 'one warp a program: the gB/gC reduce-scatter is over its lanes')
    lane = tl.arange(0, BLOCK_D)
    d64 = offs_d.to(tl.int64)
    dg = d64 * s_g_d  # channel offsets in the gradient rows
    p = tl.arange(0, CHUNK)[:, None]  # position in the chunk, inside each thread
    n_chunks = tl.cdiv(seqlen, CHUNK)
    t_lo = seg * seg_len
    c_lo = t_lo // CHUNK
    n_c = tl.cdiv(tl.minimum(seqlen - t_lo, seg_len), CHUNK)
    z_row = z_ptr + b * s_z_b + d64 * s_z_d
    go_row = gout_ptr + b * s_go_b + d64 * s_go_d
    # gu, gdelta: (2, batch, seqlen, dim), direction-major (fwd.direction_major)
    part = b * n_seg + seg  # this program's carry and gA rows

    k = K  # one launch per direction
    Dk = tl.load(D_ptr + k * s_D_k + offs_d * s_D_d, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + k * s_bias_k + offs_d * s_bias_d, mask=mask_d, other=0.0).to(tl.float32)
    u_row = u_ptr + b * s_u_b + k * s_u_k + d64 * s_u_d
    dt_row = delta_ptr + b * s_dt_b + k * s_dt_k + d64 * s_dt_d
    gu_row = gu_ptr + (k * batch + b) * seqlen * dim + dg
    gdt_row = gdelta_ptr + (k * batch + b) * seqlen * dim + dg
    # packed B and C: the same address for every channel; read a chunk whole, the padding's zeros past the sequence
    tl.static_assert(CHUNK - 1 <= PACK_PAD)
    bc_row = bc_ptr + (b * 2 + k) * (seqlen + PACK_PAD) * (2 * BLOCK_N) + offs_d * 0
    # states: (batch, 2, n_chunks - 1, dim, dstate), entry j the state at token boundary (j + 1) CHUNK
    st_row = states_ptr + (b * 2 + k) * (n_chunks - 1) * dim * dstate + offs_d * s_h_d
    # gbc: (batch, 2, n_dblocks, 2, BLOCK_N, seqlen) fp32 partials, one row a program (a warp of 32 channels); the
    # compile-time BLOCK_N keeps a lane's row offset a bit mask (a runtime dstate there was ptxas's one spill)
    gbc_row = gbc_ptr + ((b * 2 + k) * n_dblocks + pid % n_dblocks) * (2 * BLOCK_N * seqlen)
    # the carry into the segment from the next one in scan order (the boundary pass's, in rseg's layout): entry
    # seg - k holds segment seg + 1 (direction 0) or seg - 1 (direction 1)
    e = seg - k
    has_carry = (e >= 0) & (e < n_seg - 1)
    rseg_row = rseg_ptr + ((b * 2 + k) * (n_seg - 1) + e) * dim * dstate + offs_d * s_h_d
    # per (state, channel) rows of this program (batch, n_seg, 2, 2, dstate, dim) fp32: the carry between chunks
    # and gA, written at the first chunk walked before any read
    carry_row = carry_ptr + (part * 2 + k) * 2 * dstate * dim + offs_d * s_c_d
    gA_row = carry_row + dstate * dim  # one base for both: a 64-bit pointer less held across the chunk loop
    gD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(n_c):
        c = c_lo + i + (1 - k) * (n_c - 1 - 2 * i)  # reverse scan order: the last chunk first in direction 0
        t0 = c.to(tl.int64) * CHUNK  # the chunk's first token; position t is token t0 + t (t0 + CHUNK - 1 - t)
        n_in = seqlen - t0  # tokens of the chunk inside the sequence: positions past it (or, in direction 1,
        # before it) are masked, dt 0 (decay 1, no input), dy 0
        # per (token, channel), live across the state loop: dt, dt u, dy
        DT = tl.zeros((CHUNK, BLOCK_D), dtype=tl.float32)
        DTU = tl.zeros((CHUNK, BLOCK_D), dtype=tl.float32)
        DY = tl.zeros((CHUNK, BLOCK_D), dtype=tl.float32)
        # the chunk's rows: a 64-bit product a row a chunk, then a token's offset q x stride in 32 bits (q < CHUNK):
        # token x stride in 64 bits took ~6 integer instructions a load (SASS); pointers stepped a token instead
        # held their 64-bit strides across the state loop and spilled
        u_c, dt_c = u_row + t0 * s_u_l, dt_row + t0 * s_dt_l
        z_c, go_c = z_row + t0 * s_z_l, go_row + t0 * s_go_l
        for t in tl.static_range(CHUNK):
            q = t + k * (CHUNK - 1 - 2 * t)
            m = mask_d & (q < n_in)
            dt = _step_dt(_load(dt_c, q, s_dt_l, m), bias, m, DELTA_SOFTPLUS)
            z = _load(z_c, q, s_z_l, m)
            DT = _put(DT, p, t, dt)
            DTU = _put(DTU, p, t, dt * _load(u_c, q, s_u_l, m))
            DY = _put(DY, p, t, _load(go_c, q, s_go_l, m) * z * sigmoid(z) * 0.5)
        GDU = tl.zeros((CHUNK, BLOCK_D), dtype=tl.float32)  # sum_n g B
        GDA = tl.zeros((CHUNK, BLOCK_D), dtype=tl.float32)  # sum_n g a h_{t-1} A log2 e
        # the chunk's start state in scan order: boundary c CHUNK (direction 0) or (c + 1) CHUNK (1)
        j = c - 1 + k
        st = st_row + j.to(tl.int64) * dim * dstate
        has_h0 = mask_d & (j >= 0) & (j < n_chunks - 1)
        bc_c = bc_row + t0 * (2 * BLOCK_N)  # the chunk's packed B and C
        gbc_c = gbc_row + t0  # its gB and gC partials
        for n in range(dstate):
            A2n = tl.load(A_ptr + k * s_A_k + offs_d * s_A_d + n * s_A_n, mask=mask_d,
                          other=0.0).to(tl.float32) * 1.4426950408889634
            # h_t = a_t h_{t-1} + dt_t u_t B_t from the saved state, a_t = exp2(dt_t A_n log2 e) once
            h = tl.load(st + n * s_h_n, mask=has_h0, other=0.0)
            AT = tl.zeros((CHUNK, BLOCK_D), dtype=tl.float32)
            H = tl.zeros((CHUNK, BLOCK_D), dtype=tl.float32)
            AH = tl.zeros((CHUNK, BLOCK_D), dtype=tl.float32)  # a_t h_{t-1}
            for t in tl.static_range(CHUNK):
                q = t + k * (CHUNK - 1 - 2 * t)
                a = tl.exp2(pick(DT, p, t) * A2n)
                # packed B: a compile-time token stride, so a chunk's loads share one address register
                bu = pick(DTU, p, t) * tl.load(bc_c + q * (2 * BLOCK_N) + n)
                # kept as a product, not recovered as h_t - dt u B: exactly 0 at the direction's first token
                # (a GPU contracts that subtraction into an FMA and leaves the product's rounding error)
                ah = a * h
                h = ah + bu
                AT = _put(AT, p, t, a)
                H = _put(H, p, t, h)
                AH = _put(AH, p, t, ah)
            # g_t = C_t dy_t + a_{t+1} g_{t+1} from the later chunk's a g, and every gradient term of position t
            g = (tl.load(carry_row + n * dim, mask=mask_d & (i > 0), other=0.0)
                 + tl.load(rseg_row + n * s_h_n, mask=mask_d & (i == 0) & has_carry, other=0.0))
            gA_n = tl.load(gA_row + n * dim, mask=mask_d & (i > 0), other=0.0)
            RS = tl.zeros((CHUNK, BLOCK_D), dtype=tl.float32)
            for tt in tl.static_range(CHUNK):
                r = CHUNK - 1 - tt  # positions in reverse
                q = r + k * (CHUNK - 1 - 2 * r)
                h = pick(H, p, r)
                dy = pick(DY, p, r)
                Bq = tl.load(bc_c + q * (2 * BLOCK_N) + n)
                Cq = tl.load(bc_c + q * (2 * BLOCK_N) + (BLOCK_N + n))
                g = Cq * dy + g
                w = g * pick(AH, p, r)  # g a h_{r-1}
                gA_n += w * pick(DT, p, r)
                GDA = _put(GDA, p, r, pick(GDA, p, r) + w * A2n)
                GDU = _put(GDU, p, r, pick(GDU, p, r) + g * Bq)
                # gB and gC of (token, state), summed over the warp's channels (the only cross-lane work): a
                # reduce-scatter of the chunk's 2 CHUNK sums. First level: B's kept by lanes 0-15, C's by 16-31;
                # then, as soon as both are there, positions r and r + 1 (even r) exchange over lane bit 3, pairs
                # over bit 2, quadruples over bit 1: one value pending per level (in RS), so few live registers
                X = _exchange(g * pick(DTU, p, r), h * dy, lane, 16)
                for lvl in tl.static_range(3):
                    if (1 << lvl) < CHUNK and r % (1 << lvl) == 0:
                        if (r >> lvl) % 2 == 1:
                            RS = _put(RS, p, lvl, X)  # the odd group comes first (reverse order): it waits
                        else:
                            X = _exchange(X, pick(RS, p, lvl), lane, 8 >> lvl)
                if r > 0:
                    g = pick(AT, p, r) * g
            # X: each lane's sum over the reduce-scatter's lane bits; the bits below them by a plain butterfly
            gbc_sum = X
            for lvl in tl.static_range(3):
                if (4 >> lvl) < 16 // CHUNK:
                    gbc_sum += tl.gather(gbc_sum, lane ^ (4 >> lvl), 0)
            # one (token, B or C) a lane: lane l holds B's (l < 16) or C's sum of position r_rs, bit lvl of r_rs
            # being lane bit 3 - lvl; the lanes that are multiples of 16 // CHUNK store it (worked out here rather
            # than once a chunk: live across the state loop, these registers made ptxas spill)
            r_rs = lane * 0
            for lvl in tl.static_range(3):
                if (1 << lvl) < CHUNK:
                    r_rs += ((lane >> (3 - lvl)) & 1) << lvl
            q_rs = r_rs + k * (CHUNK - 1 - 2 * r_rs)
            tl.store(gbc_c + q_rs + ((lane // 16) * BLOCK_N + n) * seqlen, gbc_sum,
                     mask=(lane % (16 // CHUNK) == 0) & (q_rs < n_in))
            tl.store(carry_row + n * dim, pick(AT, p, 0) * g, mask=mask_d)
            tl.store(gA_row + n * dim, gA_n, mask=mask_d)
        gu_c, gdt_c = gu_row + t0 * dim, gdt_row + t0 * dim
        for t in tl.static_range(CHUNK):
            q = t + k * (CHUNK - 1 - 2 * t)
            m = mask_d & (q < n_in)
            u = _load(u_c, q, s_u_l, m)
            dt = pick(DT, p, t)
            dy = pick(DY, p, t)
            gdu = pick(GDU, p, t)
            gdt = _dt_grad(_load(dt_c, q, s_dt_l, m) + bias, dt, DELTA_SOFTPLUS)
            gdt = tl.where(m, (gdu * u + pick(GDA, p, t) * LN2) * gdt, 0.0)
            tl.store(gu_c + q * dim, (gdu * dt + dy * Dk).to(gu_ptr.dtype.element_ty), mask=m)
            tl.store(gdt_c + q * dim, gdt.to(gdelta_ptr.dtype.element_ty), mask=m)
            gD += dy * u
            gbias += gdt

    # gD, gbias: (batch, n_seg, n_dblocks, 2, BLOCK_D) fp32 partials, a row a program and direction, addressed from
    # the program id (an offset kept from before the chunk loop was the one value ptxas spilled at MAX_REGISTERS);
    # channels past dim hold zeros
    row = (tl.program_id(0).to(tl.int64) * 2 + k) * BLOCK_D + lane
    tl.store(gD_ptr + row, gD)
    tl.store(gbias_ptr + row, gbias)


def within_chunk_offsets(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """x, or a contiguous copy if a chunk's token offsets (chunk - 1 tokens x x's token stride, the last axis)
    would not fit the main kernel's 32-bit offsets."""
    return x if (chunk - 1) * abs(x.stride(-1)) < 2**31 else x.contiguous()


def scan_bwd(
        gout: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
        C: torch.Tensor, D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, states: torch.Tensor,
        ysum: torch.Tensor, delta_softplus: bool, chunk: int,
) -> tuple[torch.Tensor, ...]:
    """Launch the backward pass. ``states`` and ``ysum`` as ``fwd.scan_fwd`` returns them. Returns the gradients
    of (u, delta, A, B, C, D, z, delta_bias), each in the dtype of its input; those of u and delta
    direction-major (``fwd.direction_major``), z's channel-contiguous (``fwd.channel_contiguous``), B's and C's as
    ``bc_grad`` lays them out, the others contiguous."""
    u, delta, z, gout = (within_chunk_offsets(t, chunk) for t in (u, delta, z, gout))
    batch, _, dim, seqlen = u.shape
    dstate = A.shape[-1]
    dev = u.device
    sms = sm_count(dev)
    seg_len, n_seg = plan_backward_segments(batch, dim, seqlen, chunk, sms)
    block_n = triton.next_power_of_2(dstate)
    n_groups = triton.cdiv(dim, 32)
    f32 = torch.float32
    gu = direction_major(batch, dim, seqlen, dev, u.dtype)
    gdelta = direction_major(batch, dim, seqlen, dev, delta.dtype)
    gz = channel_contiguous(batch, (), dim, seqlen, dev, z.dtype)
    gbc = torch.empty(batch, 2, n_groups, 2, block_n, seqlen, device=dev, dtype=f32)
    carry = torch.empty(batch, n_seg, 2, 2, dstate, dim, device=dev, dtype=f32)  # [..., 0]: the carry, 1: gA
    gD = torch.empty(batch * n_seg, n_groups, 2, 32, device=dev, dtype=f32)
    gbias = torch.empty(batch * n_seg, n_groups, 2, 32, device=dev, dtype=f32)
    rseg = torch.empty(batch, 2, n_seg - 1, dim, dstate, device=dev, dtype=f32)
    dtsum = torch.empty(batch, 2, n_seg - 1, dim, device=dev, dtype=f32)
    bc = pack_bc(B, C, block_n)
    groups = dict(BLOCK_N=block_n, STATE_J=min(block_n, 4))
    strides = dict(u=tensor_strides(u, 4), delta=tensor_strides(delta, 4), A=tensor_strides(A, 3),
                   D=tensor_strides(D, 2), bias=tensor_strides(delta_bias, 2), z=tensor_strides(z, 3),
                   gout=tensor_strides(gout, 3))
    blocks = lambda meta: triton.cdiv(dim, meta['BLOCK_D'])  # noqa: E731
    if n_seg > 1:
        _segment_carry_kernel[lambda meta: (blocks(meta) * batch * 2 * (n_seg - 1),)](
            delta, A, bc, z, delta_bias, gout, rseg, dtsum,
            batch, seqlen, dim, dstate, seg_len, n_seg, 1, dstate,
            *strides['delta'], *strides['A'], *strides['bias'], *strides['z'], *strides['gout'],
            DELTA_SOFTPLUS=delta_softplus, **groups,
        )
        _segment_boundary_kernel[lambda meta: (blocks(meta) * batch * 2,)](
            A, rseg, dtsum, batch, dim, dstate, n_seg, 1, dstate, *strides['A'], REVERSE=1, **groups,
        )
    # flat grid: programs (channel block, segment, batch element), batch-major (no 65,535 limit on batch)
    for k in (1, 0):
        _bidirectional_scan_bwd_kernel[lambda meta: (blocks(meta) * n_seg * batch,)](
            u, delta, A, bc, D, z, delta_bias, gout, states, rseg, carry,
            gu, gdelta, gbc, gD, gbias,
            batch, seqlen, dim, dstate, seg_len, n_seg, 1, dstate, 1, 1,
            *strides['u'], *strides['delta'], *strides['A'], *strides['D'], *strides['bias'], *strides['z'],
            *strides['gout'],
            DELTA_SOFTPLUS=delta_softplus, CHUNK=chunk, BLOCK_N=block_n, K=k,
        )
    _gate_grad_kernel[(triton.cdiv(seqlen, GATE_BLOCK_L) * triton.cdiv(dim, GATE_BLOCK_D) * batch,)](
        ysum, z, gout, gz, seqlen, dim, *strides['z'], *strides['gout'], BLOCK_L=GATE_BLOCK_L, BLOCK_D=GATE_BLOCK_D,
        num_warps=GATE_WARPS,
    )
    gbc = gbc.sum(2)  # (batch, 2, 2, block_n, seqlen), token order; states past dstate never written
    gB, gC = (bc_grad(t).copy_(gbc[:, :, i, :dstate]) for i, t in ((0, B), (1, C)))
    gA = carry[:, :, :, 1].sum((0, 1)).transpose(1, 2).to(A.dtype).contiguous()
    return (gu, gdelta, gA, gB, gC, _channel_sum(gD, dim, D.dtype), gz, _channel_sum(gbias, dim, delta_bias.dtype))


def bc_grad(t: torch.Tensor) -> torch.Tensor:
    """An empty buffer for the gradient of B or C (batch, 2, dstate, seqlen), in t's dtype: direction-major and
    token-major (``fwd.direction_major``) if t is token-major, as x_proj's output is, so that the gradient reaches
    x_proj's GEMM without a copy; else contiguous."""
    batch, _, dstate, seqlen = t.shape
    if t.stride(-2) == 1 and seqlen > 1:
        return direction_major(batch, dstate, seqlen, t.device, t.dtype)
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _channel_sum(partials: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """(programs, n_groups, 2, 32) partials -> (2, dim) in ``dtype``: summed over programs, channels in order."""
    return partials.sum(0).transpose(0, 1).reshape(2, -1)[:, :dim].to(dtype).contiguous()
