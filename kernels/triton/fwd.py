"""Forward pass of the fused bidirectional selective scan: a sequential token loop in which each thread owns whole
channels, their 16 states in its own registers.

Per token and channel the loop computes ``dt = softplus(delta + bias)`` once, then for each state one exp2 (A comes
pre-scaled by log2 e), ``h = exp2(dt A) h + dt u B`` and ``y += C h``: the sum over states runs inside the thread,
so the token loop has no shuffles and no barriers (the static report, :mod:`vim.kernels.triton.report`, checks the
compiled code). The state is four (4, BLOCK_D) tiles (4 states x a channel per lane), not one 3-D tile, so that no
Triton version can spread the state axis over lanes (see MAX_DSTATE). B and C come packed token-major in fp32
(pack.py): a token's 2 x 16 values are 8 vector loads. The next token's inputs are loaded one iteration ahead
(software prefetch).

To fill the GPU at small batch the sequence is split into segments of whole chunks (``plan_segments``); then the
scan runs in three launches, as chunked scans do (mamba_ssm's chunked state passing, flash-linear-attention):

1. ``_segment_state_kernel``: per (channel block, direction, batch element, segment) the state at the segment's
   end from a zero start, and the segment's sum of dt (its total decay is exp2(A sum dt)); the last segment of
   each scan order is not needed.
2. ``_segment_boundary_kernel``: per (channel block, direction, batch element) a walk over the segments that turns
   those local states into the true state after each segment, in place; a thread for each (channel, state), several
   segments loaded at once and composed by a scan inside the thread.
3. ``_scan_output_kernel``: per (channel block, batch element, segment) both directions from their true start
   states; the backward direction first, its ungated y kept in a private fp32 row that the forward direction reads
   back to write ``(y0 + y1) silu(z) / 2`` once, in the output's dtype (no zero fill, no atomics, no cast kernel).
   With a backward pass to follow it also stores the state at every CHUNK-token boundary of the sequence, in both
   directions, and the ungated sum ``y0 + y1`` for the gate's gradient.

Without a split (enough batch elements) only launch 3 runs. Every tensor offset is int64 (batch and token terms).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import affine_combine, autotune_configs, pick, silu, softplus, tensor_strides
from .pack import PACK_PAD, pack_bc

__all__ = ['scan_fwd', 'scan_output', 'channel_contiguous', 'sm_count', 'plan_segments', 'plan_split', 'MIN_SEGMENT',
           'MAX_DSTATE']

# (BLOCK_D, num_warps, num_stages[, UNROLL]): one channel a thread, whose registers hold its 16 states, 16 A, and the
# packed B and C of the current and the prefetched token. The output loop unrolled by 2 issues ~5% fewer
# instructions per element than by 1, at 96-101 registers either way (static report): both are offered and the
# autotuner measures which wins.
_OUTPUT_CONFIGS = [(64, 2, 1, 2), (32, 1, 1, 2), (128, 4, 1, 2), (64, 2, 1, 1), (32, 1, 1, 1)]
_STATE_CONFIGS = [(64, 2, 1), (32, 1, 1), (128, 4, 1)]
# The boundary walk: BLOCK_D x 16 (channel, state) pairs a program, one or more a thread, BLOCK_S segment entries
# loaded at once per iteration. A short walk (224 px: 1-2 entries, many programs) wastes least with a short BLOCK_S
# and several pairs a thread; a long one (1248 px at batch 1: ~95 entries, few programs) overlaps most loads with a
# long BLOCK_S and a pair a thread (static report: 31.6 -> 6.8 us predicted against the 16-state walk a thread).
_BOUNDARY_CONFIGS = [triton.Config(dict(BLOCK_D=block_d, BLOCK_S=block_s), num_warps=warps, num_stages=1)
                     for block_d, warps, block_s in ((8, 4, 2), (8, 4, 8), (8, 4, 16), (32, 2, 2))]

# The sequence split: segments are whole chunks and at least MIN_SEGMENT tokens; SM_SUBPARTITIONS (4 per SM, one
# warp scheduler each) share the warps, the H100's 132 SMs unless the device says otherwise.
MIN_SEGMENT = 32
SUBPARTITIONS_PER_SM = 4
H100_SMS = 132
# the segment-state pass's work per token relative to the output pass's, per direction (no C, no y: 4 of its 5
# operations per state, from the static report)
_STATE_PASS_COST = 0.8
# A warp of these sequential token loops issues about once every ISSUE_INTERVAL cycles on its own (dependency
# chains, load latency), so a scheduler issues every cycle only with that many resident warps. Measured on an H100
# (Nsight Compute, 2026-11-26, benchmarks/README.md): 6.6 cycles per issued instruction in the segment-state pass
# with 4 warps a scheduler; the forward ran at 16.6x its floor with ~12 warps a scheduler (8 x 6,085 tokens) and at
# 95.6x with ~1 (1 x 16,385). RESIDENT_*: the warps a scheduler can hold of each pass (registers, static report:
# the output pass 96-101, 5 warps; the state pass 64, 8).
ISSUE_INTERVAL = 6.6
RESIDENT_OUTPUT = 5
RESIDENT_STATE = 8
# What a split moves through memory besides the passes' own inputs, per (segment boundary, batch element, direction,
# channel): the side pass writes a state and a dt sum (17 fp32), the boundary walk reads and rewrites them (33), the
# main pass reads the state (16); at the copy bandwidth of an H100 (3.0 TB/s, 1.98 GHz: the static report's), in the
# planner's unit, a warp's token step of the output pass (~11 instructions per element x 16 states, static report).
_SPLIT_BYTES = 66 * 4
BYTES_PER_CLOCK = 3.0e12 / 1.98e9
TOKEN_STEP_CLOCKS = 176


def _split_time(batch: int, dim: int, n_seg: int) -> float:
    """Time, in token steps of the output pass, that a split into ``n_seg`` segments spends moving segment states
    (``_SPLIT_BYTES``)."""
    return batch * 2 * (n_seg - 1) * dim * _SPLIT_BYTES / BYTES_PER_CLOCK / TOKEN_STEP_CLOCKS


def issue_rate(live: int) -> float:
    """Instructions a clock that a scheduler issues holding ``live`` warps of these loops: ``min(1, live /
    ISSUE_INTERVAL)``."""
    return min(1.0, live / ISSUE_INTERVAL)


def _pass_time(warps: int, per_warp: float, resident: int, slots: int) -> float:
    """Issue time of ``warps`` warps of ``per_warp`` work each, spread over ``slots`` schedulers that hold at most
    ``resident`` at once and issue at ``min(1, live warps / ISSUE_INTERVAL)`` per cycle. Warps of equal work finish
    together, so a scheduler's share beyond ``resident`` runs in waves: the last one's few warps issue at their own
    low rate. (The fifth H100 run measured it: at 8 x 6,085 the backward's 4 warps a scheduler took as long at 3
    resident as at 2, two waves either way, and at 128 x 197 1.6x less time, one wave instead of two.)"""
    full, rest = divmod(triton.cdiv(warps, slots), resident)

    def wave(live: int) -> float:
        return live * per_warp / issue_rate(live)
    return full * wave(resident) + (wave(rest) if rest else 0.0)


# Strides along channels and states of the inputs are runtime values, never specialised: a stride known to be 1
# would let Triton vectorise that load along channels, giving it a layout other than the loop's (a thread owns whole
# channels), and the conversion between the two costs shuffles and barriers inside the token loop. The kernels' own
# state buffers (hseg, states) are (..., dim, dstate), with s_h_n = 1 and s_h_d = dstate specialised: their stores
# inside the loop are then 16-byte vectors along a thread's own states, the loop's layout.
_CHANNEL_STRIDES = ['s_u_d', 's_dt_d', 's_A_d', 's_A_n', 's_D_d', 's_bias_d', 's_z_d']
# The token loops hold the state as 4 (STATE_J, BLOCK_D) tiles, not one 3-D tile: on a (G, J, BLOCK_D) tile the
# B load's contiguity ties the group and channel axes, Triton 3.6 (torch 2.11's) breaks the tie towards the group
# axis and spreads lanes over states, and its token loops compiled with SHFL and BAR (Triton 3.8 broke it the other
# way). With 2-D tiles a load's axes never tie. Hence d_state <= 4 * STATE_J = 16.
MAX_DSTATE = 16


def plan_segments(batch: int, dim: int, seqlen: int, chunk: int, sms: int = H100_SMS) -> tuple[int, int]:
    """(segment length, a multiple of ``chunk``; number of segments) for the forward's sequence split.

    Picks the count that minimises a latency-aware issue-time model in warps of 32 channels on the ``4 * sms``
    schedulers (``_pass_time``): the output pass runs ``batch x channel warps x segments`` warps of ``2 x segment``
    token steps (both directions), the state pass ``2 x batch x channel warps x (segments - 1)`` warps of
    ``0.8 x segment``. Splitting adds the state pass's exps, and pays where the batch alone leaves schedulers with
    too few warps to hide each warp's latency.
    """
    return plan_split(batch, dim, seqlen, chunk, sms, 1.0, RESIDENT_OUTPUT, _STATE_PASS_COST, RESIDENT_STATE)


@functools.lru_cache(maxsize=4096)
def plan_split(batch: int, dim: int, seqlen: int, chunk: int, sms: int, main_cost: float, main_resident: int,
               side_cost: float, side_resident: int) -> tuple[int, int]:
    """The segment plan of a split scan (forward or backward): a main pass of ``batch x channel warps x segments``
    warps, each ``main_cost`` per token and direction over both directions of its segment, after a side pass of
    ``2 x batch x channel warps x (segments - 1)`` warps of ``side_cost`` per token and the segment states' memory
    traffic (``_split_time``); ``*_resident``: the warps a scheduler holds of each. Returns the (segment length,
    count) of least modelled time over every segment length of whole chunks (at least MIN_SEGMENT tokens where
    split), the longest of equal cost.

    Runs on the host before every launch, so it visits only the shortest length of each segment count (a longer
    one with the same count only costs more), ~2 sqrt(chunks) lengths, and remembers its answers: at 8 x 6,085
    tokens walking all 761 lengths took 13.5 ms a call on a 2-vCPU VM, and an H100 run measured the forward at
    4.9 ms a call against ~0.8 ms of kernels (benchmarks/README.md, third GPU run).
    """
    units = batch * triton.cdiv(dim, 32)
    slots = SUBPARTITIONS_PER_SM * sms
    n_chunks = triton.cdiv(seqlen, chunk)
    shortest = triton.cdiv(MIN_SEGMENT, chunk) * chunk  # a split's shortest segment
    best, visited, count = None, None, 1
    while count <= n_chunks:
        seg = triton.cdiv(n_chunks, count) * chunk  # the shortest segment of whole chunks that gives `count`
        too_short = triton.cdiv(seqlen, seg) > 1 and seg < MIN_SEGMENT
        if too_short:  # the shortest allowed length gives the last count worth a look
            seg = shortest
            if visited is not None and seg >= visited:
                break
        n_seg = triton.cdiv(seqlen, seg)
        tokens = min(seg, seqlen)  # the longest segment's
        cost = _pass_time(units * n_seg, 2 * main_cost * tokens, main_resident, slots)
        if n_seg > 1:
            cost += (_pass_time(units * 2 * (n_seg - 1), side_cost * tokens, side_resident, slots)
                     + _split_time(batch, dim, n_seg))
        if best is None or cost < best[0]:
            best = (cost, seg, n_seg)
        if too_short:
            break
        visited = seg
        count = triton.cdiv(n_chunks, seg // chunk - 1) if seg > chunk else n_chunks + 1  # next: one chunk shorter
    return best[1], best[2]


@triton.jit
def _channels(pid, n_dblocks, dim, BLOCK_D: tl.constexpr):
    """Channel offsets (BLOCK_D,) of the program's channel block (``pid`` modulo ``n_dblocks``) and their mask."""
    offs_d = (pid % n_dblocks).to(tl.int32) * BLOCK_D + tl.arange(0, BLOCK_D)
    return offs_d, offs_d < dim


@triton.jit
def _side_program(dim, n_seg, BLOCK_D: tl.constexpr):
    """A side pass's program (a split's per-segment state or carry pass): channel block and entry e of (batch,
    direction) bk = 2 b + k. Returns (e, bk, b, k, offs_d, mask_d); entry e is one of the n_seg - 1 segments whose
    state a neighbour needs."""
    pid = tl.program_id(0).to(tl.int64)
    n_dblocks = tl.cdiv(dim, BLOCK_D)
    e = (pid // n_dblocks) % (n_seg - 1)
    bk = pid // (n_dblocks * (n_seg - 1))
    offs_d, mask_d = _channels(pid, n_dblocks, dim, BLOCK_D)
    return e, bk, bk // 2, bk % 2, offs_d, mask_d


@triton.jit
def _packed_rows(bc_ptr, bk, seqlen, offs_d, STATE_J: tl.constexpr, BLOCK_N: tl.constexpr):
    """(STATE_J, BLOCK_D) pointers to token 0's first STATE_J packed values of (batch, direction) ``bk``, the same
    for every channel; token t's B at ``+ t * 2 * BLOCK_N``, its C ``BLOCK_N`` further."""
    return bc_ptr + bk * (seqlen + PACK_PAD) * (2 * BLOCK_N) + tl.arange(0, STATE_J)[:, None] + offs_d[None, :] * 0


@triton.jit
def _group(g: tl.constexpr, dstate, offs_d, mask_d, STATE_J: tl.constexpr):
    """State indices (STATE_J, 1) of state group g, channels (1, BLOCK_D), and the group's tile mask."""
    n2 = g * STATE_J + tl.arange(0, STATE_J)[:, None]
    return n2, offs_d[None, :], (n2 < dstate) & mask_d[None, :]


@triton.jit
def _zero_groups(STATE_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """Four (STATE_J, BLOCK_D) fp32 zero tiles: a state (or carry) of 16 states a channel."""
    z = tl.zeros((STATE_J, BLOCK_D), dtype=tl.float32)
    return z, z, z, z


@triton.jit
def _load_groups(ptr, s_n, s_d, dstate, offs_d, mask_d, other_mask, STATE_J: tl.constexpr, N_GROUPS: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """The 4 (STATE_J, BLOCK_D) fp32 tiles of ``ptr[state * s_n + channel * s_d]``; zeros past N_GROUPS."""
    n2, d2, m = _group(0, dstate, offs_d, mask_d, STATE_J)
    x0 = tl.load(ptr + n2 * s_n + d2 * s_d, mask=m & other_mask, other=0.0).to(tl.float32)
    x1 = tl.zeros((STATE_J, BLOCK_D), dtype=tl.float32)
    x2 = tl.zeros((STATE_J, BLOCK_D), dtype=tl.float32)
    x3 = tl.zeros((STATE_J, BLOCK_D), dtype=tl.float32)
    if N_GROUPS > 1:
        n2, d2, m = _group(1, dstate, offs_d, mask_d, STATE_J)
        x1 = tl.load(ptr + n2 * s_n + d2 * s_d, mask=m & other_mask, other=0.0).to(tl.float32)
    if N_GROUPS > 2:
        n2, d2, m = _group(2, dstate, offs_d, mask_d, STATE_J)
        x2 = tl.load(ptr + n2 * s_n + d2 * s_d, mask=m & other_mask, other=0.0).to(tl.float32)
        n2, d2, m = _group(3, dstate, offs_d, mask_d, STATE_J)
        x3 = tl.load(ptr + n2 * s_n + d2 * s_d, mask=m & other_mask, other=0.0).to(tl.float32)
    return x0, x1, x2, x3


@triton.jit
def _store_groups(ptr, s_n, s_d, x0, x1, x2, x3, dstate, offs_d, mask_d, STATE_J: tl.constexpr,
                  N_GROUPS: tl.constexpr):
    """Store the tiles of ``_load_groups`` to ``ptr[state * s_n + channel * s_d]``."""
    n2, d2, m = _group(0, dstate, offs_d, mask_d, STATE_J)
    tl.store(ptr + n2 * s_n + d2 * s_d, x0, mask=m)
    if N_GROUPS > 1:
        n2, d2, m = _group(1, dstate, offs_d, mask_d, STATE_J)
        tl.store(ptr + n2 * s_n + d2 * s_d, x1, mask=m)
    if N_GROUPS > 2:
        n2, d2, m = _group(2, dstate, offs_d, mask_d, STATE_J)
        tl.store(ptr + n2 * s_n + d2 * s_d, x2, mask=m)
        n2, d2, m = _group(3, dstate, offs_d, mask_d, STATE_J)
        tl.store(ptr + n2 * s_n + d2 * s_d, x3, mask=m)


@triton.jit
def _packed(row, STATE_J: tl.constexpr, N_GROUPS: tl.constexpr):
    """One token's packed B (or C) as 4 (STATE_J, BLOCK_D) tiles, each a 16-byte load broadcast over channels;
    ``row`` is (STATE_J, BLOCK_D) pointers to the token's first STATE_J values. Zeros past N_GROUPS."""
    x0 = tl.load(row)
    x1 = tl.zeros_like(x0)
    x2 = tl.zeros_like(x0)
    x3 = tl.zeros_like(x0)
    if N_GROUPS > 1:
        x1 = tl.load(row + STATE_J)
    if N_GROUPS > 2:
        x2 = tl.load(row + 2 * STATE_J)
        x3 = tl.load(row + 3 * STATE_J)
    return x0, x1, x2, x3


@triton.jit
def _update(h0, h1, h2, h3, A0, A1, A2, A3, B0, B1, B2, B3, dt, x, N_GROUPS: tl.constexpr):
    """h = exp2(dt A) h + x B for each state group; dt, x: (BLOCK_D,)."""
    dt2 = dt[None, :]
    x2 = x[None, :]
    h0 = tl.exp2(dt2 * A0) * h0 + x2 * B0
    if N_GROUPS > 1:
        h1 = tl.exp2(dt2 * A1) * h1 + x2 * B1
    if N_GROUPS > 2:
        h2 = tl.exp2(dt2 * A2) * h2 + x2 * B2
        h3 = tl.exp2(dt2 * A3) * h3 + x2 * B3
    return h0, h1, h2, h3


@triton.jit
def _contract(h0, h1, h2, h3, C0, C1, C2, C3, N_GROUPS: tl.constexpr):
    """sum over states of C h: (BLOCK_D,), inside each thread. The groups' products are summed elementwise first
    (an FMA each) and the STATE_J rows last: 19 instructions for 16 states, where a sum per group cost 23."""
    p = h0 * C0
    if N_GROUPS > 1:
        p += h1 * C1
    if N_GROUPS > 2:
        p += h2 * C2
        p += h3 * C3
    return tl.sum(p, axis=0)


@triton.jit
def _scaled_A(A_ptr, s_A_k, s_A_d, s_A_n, k, dstate, offs_d, mask_d, STATE_J: tl.constexpr, N_GROUPS: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """Direction k's A * log2(e) as 4 (STATE_J, BLOCK_D) fp32 tiles: exp(dt A) = exp2(dt A log2 e)."""
    A0, A1, A2, A3 = _load_groups(A_ptr + k * s_A_k, s_A_n, s_A_d, dstate, offs_d, mask_d, True, STATE_J, N_GROUPS,
                                  BLOCK_D)
    log2e = 1.4426950408889634
    return A0 * log2e, A1 * log2e, A2 * log2e, A3 * log2e


@triton.jit
def _params(A_ptr, D_ptr, bias_ptr, s_A_k, s_A_d, s_A_n, s_D_k, s_D_d, s_bias_k, s_bias_d, k, dstate, offs_d, mask_d,
            STATE_J: tl.constexpr, N_GROUPS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Direction k's ``_scaled_A`` tiles, D and delta bias (BLOCK_D,), fp32."""
    A0, A1, A2, A3 = _scaled_A(A_ptr, s_A_k, s_A_d, s_A_n, k, dstate, offs_d, mask_d, STATE_J, N_GROUPS, BLOCK_D)
    Dk = tl.load(D_ptr + k * s_D_k + offs_d * s_D_d, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + k * s_bias_k + offs_d * s_bias_d, mask=mask_d, other=0.0).to(tl.float32)
    return A0, A1, A2, A3, Dk, bias


@triton.jit
def _step_dt(dt_raw, bias, mask_d, DELTA_SOFTPLUS: tl.constexpr):
    """dt of one token (BLOCK_D,), fp32; 0 on padding channels (decay 1, input 0)."""
    dt = dt_raw.to(tl.float32) + bias
    if DELTA_SOFTPLUS:
        dt = softplus(dt)
    return tl.where(mask_d, dt, 0.0)


@triton.autotune(configs=autotune_configs(_STATE_CONFIGS), key=['dim', 'dstate', 'batch', 'n_seg'])
@triton.jit(do_not_specialize=['seqlen', 'seg_len', 'n_seg', *_CHANNEL_STRIDES])
def _segment_state_kernel(
        u_ptr, delta_ptr, A_ptr, bc_ptr, bias_ptr, hseg_ptr, dtsum_ptr,
        batch, seqlen, dim, dstate, seg_len, n_seg, s_h_n, s_h_d,
        s_u_b, s_u_k, s_u_d, s_u_l,
        s_dt_b, s_dt_k, s_dt_d, s_dt_l,
        s_A_k, s_A_d, s_A_n,
        s_bias_k, s_bias_d,
        DELTA_SOFTPLUS: tl.constexpr, BLOCK_N: tl.constexpr, STATE_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # entry e is segment e (direction 0) or e + 1 (1)
    N_GROUPS: tl.constexpr = BLOCK_N // STATE_J  # state tiles in use (of 4)
    e, bk, b, k, offs_d, mask_d = _side_program(dim, n_seg, BLOCK_D)
    A0, A1, A2, A3, _, bias = _params(A_ptr, A_ptr, bias_ptr, s_A_k, s_A_d, s_A_n, 0, 0, s_bias_k, s_bias_d, k,
                                      dstate, offs_d, mask_d, STATE_J, N_GROUPS, BLOCK_D)
    u_row = u_ptr + b * s_u_b + k * s_u_k + offs_d.to(tl.int64) * s_u_d
    dt_row = delta_ptr + b * s_dt_b + k * s_dt_k + offs_d.to(tl.int64) * s_dt_d
    B_row = _packed_rows(bc_ptr, bk, seqlen, offs_d, STATE_J, BLOCK_N)
    seg = e + k
    t_lo = seg * seg_len
    n_tok = tl.minimum(seqlen - t_lo, seg_len)
    # scan position i -> token t_lo + i (direction 0) or t_lo + n_tok - 1 - i (direction 1)
    first = t_lo + k * (n_tok - 1)
    step = 1 - 2 * k

    h0, h1, h2, h3 = _zero_groups(STATE_J, BLOCK_D)
    dtsum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    u_n = tl.load(u_row + first * s_u_l, mask=mask_d, other=0.0)
    dt_n = tl.load(dt_row + first * s_dt_l, mask=mask_d, other=0.0)
    B0n, B1n, B2n, B3n = _packed(B_row + first * (2 * BLOCK_N), STATE_J, N_GROUPS)
    for i in range(n_tok):
        u, dt_raw, B0, B1, B2, B3 = u_n, dt_n, B0n, B1n, B2n, B3n
        t_next = first + step * tl.minimum(i + 1, n_tok - 1)  # the last iteration re-reads its own token
        u_n = tl.load(u_row + t_next * s_u_l, mask=mask_d, other=0.0)
        dt_n = tl.load(dt_row + t_next * s_dt_l, mask=mask_d, other=0.0)
        B0n, B1n, B2n, B3n = _packed(B_row + t_next * (2 * BLOCK_N), STATE_J, N_GROUPS)
        dt = _step_dt(dt_raw, bias, mask_d, DELTA_SOFTPLUS)
        dtsum += dt
        h0, h1, h2, h3 = _update(h0, h1, h2, h3, A0, A1, A2, A3, B0, B1, B2, B3, dt, dt * u.to(tl.float32),
                                 N_GROUPS)

    # hseg: (batch, 2, n_seg - 1, dim, dstate) fp32; dtsum: (batch, 2, n_seg - 1, dim) fp32
    row = (bk * (n_seg - 1) + e) * dim
    _store_groups(hseg_ptr + row * dstate, s_h_n, s_h_d, h0, h1, h2, h3, dstate, offs_d, mask_d, STATE_J, N_GROUPS)
    tl.store(dtsum_ptr + row + offs_d, dtsum, mask=mask_d)


# In place on hseg: the autotuner's benchmark runs each config several times on the same buffers, so it must restore
# hseg after each run (without it the first call at a new shape composes the boundary walk with itself).
# s_h_n, s_h_d are runtime values here: a stride known to be 1 would let Triton vectorise the hseg loads along the
# states, and the (BLOCK_S, BLOCK_D x BLOCK_N) tiles would then spread their segment axis over lanes and
# warps, which the scan along it would pay for in shuffles and barriers.
@triton.autotune(configs=autotune_configs(_BOUNDARY_CONFIGS), key=['dim', 'dstate', 'batch', 'n_seg'],
                 restore_value=['hseg_ptr'])
@triton.jit(do_not_specialize=['n_seg', 's_h_n', 's_h_d', *_CHANNEL_STRIDES])
def _segment_boundary_kernel(
        A_ptr, hseg_ptr, dtsum_ptr,
        batch, dim, dstate, n_seg, s_h_n, s_h_d,
        s_A_k, s_A_d, s_A_n,
        REVERSE: tl.constexpr, BLOCK_N: tl.constexpr, STATE_J: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_S: tl.constexpr,
):
    # the program's BLOCK_D x BLOCK_N (channel, state) pairs are spread over its threads; each iteration loads
    # BLOCK_S entries at once (their loads overlap) and composes their affine maps h -> exp2(dtsum A) h + hseg by a
    # scan along the entries, inside each thread
    pid = tl.program_id(0).to(tl.int64)
    n_dblocks = tl.cdiv(dim, BLOCK_D)
    bk = pid // n_dblocks
    k = bk % 2
    offs_x = tl.arange(0, BLOCK_D * BLOCK_N)
    offs_d = (pid % n_dblocks).to(tl.int32) * BLOCK_D + offs_x // BLOCK_N
    offs_n = offs_x % BLOCK_N
    mask_x = (offs_d < dim) & (offs_n < dstate)
    A = tl.load(A_ptr + k * s_A_k + offs_d * s_A_d + offs_n * s_A_n, mask=mask_x, other=0.0).to(tl.float32)
    A = A * 1.4426950408889634  # exp(dt A) = exp2(dt A log2 e)
    h_off = offs_d * s_h_d + offs_n * s_h_n
    rows = tl.arange(0, BLOCK_S)
    h = tl.zeros((BLOCK_D * BLOCK_N,), dtype=tl.float32)
    n_e = n_seg - 1
    # entries in scan order: increasing (direction 0), decreasing (1); REVERSE (the backward's gradient carries,
    # bwd.py) walks them against it. Row r of an iteration is entry e0 + step r: one int64 base an iteration, int32
    # offsets from it.
    backwards = k ^ REVERSE
    step = 1 - 2 * backwards
    d_row = (rows * step.to(tl.int32)) * dim  # (BLOCK_S,) dtsum offsets of the rows from the iteration's first
    for j0 in range(0, n_e, BLOCK_S):
        e0 = j0 + backwards * (n_e - 1 - 2 * j0)
        base = (bk * n_e + e0) * dim
        m = (j0 + rows < n_e)[:, None] & mask_x[None, :]
        dtsum = tl.load(dtsum_ptr + base + (d_row[:, None] + offs_d[None, :]), mask=m, other=0.0)
        ptrs = hseg_ptr + base * dstate + (d_row[:, None] * dstate + h_off[None, :])
        # padding entries map h to itself (dtsum 0: decay 1, nothing added)
        decay, local = tl.associative_scan((tl.exp2(dtsum * A[None, :]), tl.load(ptrs, mask=m, other=0.0)), 0,
                                           affine_combine)
        hs = decay * h[None, :] + local
        tl.store(ptrs, hs, mask=m)
        h = pick(hs, rows[:, None], BLOCK_S - 1)  # the block's last entry, in-thread


@triton.jit
def _scan_direction(u_row, dt_row, bc_row, s_u_l, s_dt_l, first, step, n_tok, h0, h1, h2, h3, A0, A1, A2, A3, Dk,
                    bias, dstate, offs_d, mask_d, y1_row, z_row, s_z_l, out_row, ysum_row, s_y_l, states_row,
                    chunk_stride,
                    s_h_n, s_h_d, seqlen,
                    DIRECTION: tl.constexpr, DELTA_SOFTPLUS: tl.constexpr, STORE_STATES: tl.constexpr,
                    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, STATE_J: tl.constexpr, N_GROUPS: tl.constexpr,
                    UNROLL: tl.constexpr):
    """One direction over one segment: n_tok tokens from token ``first`` by ``step``, from state h. Direction 1
    stores its ungated y to ``y1_row``; direction 0 reads it back and writes the gated mean to ``out_row`` and, for
    a backward (STORE_STATES), the ungated sum to ``ysum_row`` (the gate's gradient needs it; mamba_ssm saves its
    ungated output too). All rows channel-contiguous, ``s_y_l`` apart per token: a warp's store of one token is one
    contiguous run."""
    u_n = tl.load(u_row + first * s_u_l, mask=mask_d, other=0.0)
    dt_n = tl.load(dt_row + first * s_dt_l, mask=mask_d, other=0.0)
    B0n, B1n, B2n, B3n = _packed(bc_row + first * (2 * BLOCK_N), STATE_J, N_GROUPS)
    C0n, C1n, C2n, C3n = _packed(bc_row + first * (2 * BLOCK_N) + BLOCK_N, STATE_J, N_GROUPS)
    # direction 0 also prefetches the gate and the other direction's y (direction 1 carries unused zeros)
    z_n = tl.zeros_like(u_n)
    y1_n = tl.zeros_like(u_n.to(tl.float32))
    if DIRECTION == 0:
        z_n = tl.load(z_row + first * s_z_l, mask=mask_d, other=0.0)
        y1_n = tl.load(y1_row + first * s_y_l, mask=mask_d, other=0.0)
    for i in tl.range(n_tok, loop_unroll_factor=UNROLL):  # UNROLL 2: the prefetched tiles alternate, no copies
        t = first + step * i
        u, dt_raw = u_n, dt_n
        B0, B1, B2, B3, C0, C1, C2, C3 = B0n, B1n, B2n, B3n, C0n, C1n, C2n, C3n
        t_next = first + step * tl.minimum(i + 1, n_tok - 1)  # the last iteration re-reads its own token
        u_n = tl.load(u_row + t_next * s_u_l, mask=mask_d, other=0.0)
        dt_n = tl.load(dt_row + t_next * s_dt_l, mask=mask_d, other=0.0)
        B0n, B1n, B2n, B3n = _packed(bc_row + t_next * (2 * BLOCK_N), STATE_J, N_GROUPS)
        C0n, C1n, C2n, C3n = _packed(bc_row + t_next * (2 * BLOCK_N) + BLOCK_N, STATE_J, N_GROUPS)
        z, y_other = z_n, y1_n
        if DIRECTION == 0:
            z_n = tl.load(z_row + t_next * s_z_l, mask=mask_d, other=0.0)
            y1_n = tl.load(y1_row + t_next * s_y_l, mask=mask_d, other=0.0)
        u = u.to(tl.float32)
        dt = _step_dt(dt_raw, bias, mask_d, DELTA_SOFTPLUS)
        h0, h1, h2, h3 = _update(h0, h1, h2, h3, A0, A1, A2, A3, B0, B1, B2, B3, dt, dt * u, N_GROUPS)
        y = _contract(h0, h1, h2, h3, C0, C1, C2, C3, N_GROUPS) + u * Dk
        if DIRECTION == 1:
            tl.store(y1_row + t * s_y_l, y, mask=mask_d)
        else:
            y += y_other
            if STORE_STATES:
                tl.store(ysum_row + t * s_y_l, y.to(ysum_row.dtype.element_ty), mask=mask_d)
            y = y * silu(z.to(tl.float32)) * 0.5
            tl.store(out_row + t * s_y_l, y.to(out_row.dtype.element_ty), mask=mask_d)
        if STORE_STATES:
            # the state at each token boundary j * CHUNK inside the sequence, as entry j - 1, in both directions
            # (after token j * CHUNK - 1 in direction 0, after token j * CHUNK in 1): chunks and segments are the
            # same token ranges in both scan orders
            bnd = t + 1 - DIRECTION
            if (bnd % CHUNK == 0) & (bnd > 0) & (bnd < seqlen):
                _store_groups(states_row + (bnd // CHUNK - 1) * chunk_stride, s_h_n, s_h_d, h0, h1, h2, h3, dstate,
                              offs_d, mask_d, STATE_J, N_GROUPS)


@triton.autotune(configs=autotune_configs(_OUTPUT_CONFIGS), key=['dim', 'dstate', 'batch', 'n_seg'])
@triton.jit(do_not_specialize=['seqlen', 'seg_len', 'n_seg', *_CHANNEL_STRIDES])
def _scan_output_kernel(
        u_ptr, delta_ptr, A_ptr, bc_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, ysum_ptr, y1_ptr, hseg_ptr, states_ptr,
        batch, seqlen, dim, dstate, seg_len, n_seg, s_h_n, s_h_d,
        s_u_b, s_u_k, s_u_d, s_u_l,
        s_dt_b, s_dt_k, s_dt_d, s_dt_l,
        s_A_k, s_A_d, s_A_n,
        s_D_k, s_D_d,
        s_bias_k, s_bias_d,
        s_z_b, s_z_d, s_z_l,
        DELTA_SOFTPLUS: tl.constexpr, STORE_STATES: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
        STATE_J: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr,
):
    # program -> (channel block, segment, batch element)
    N_GROUPS: tl.constexpr = BLOCK_N // STATE_J  # state tiles in use (of 4)
    pid = tl.program_id(0).to(tl.int64)
    n_dblocks = tl.cdiv(dim, BLOCK_D)
    seg = (pid // n_dblocks) % n_seg
    b = pid // (n_dblocks * n_seg)
    offs_d, mask_d = _channels(pid, n_dblocks, dim, BLOCK_D)
    t_lo = seg * seg_len
    n_tok = tl.minimum(seqlen - t_lo, seg_len)
    n_chunks = tl.cdiv(seqlen, CHUNK)
    # out, ysum, y1: (batch, seqlen, dim) in memory; states (batch, 2, n_chunks - 1, dim, dstate); hseg (batch, 2,
    # n_seg - 1, dim, dstate)
    out_row = out_ptr + b * seqlen * dim + offs_d
    ysum_row = ysum_ptr + b * seqlen * dim + offs_d
    y1_row = y1_ptr + b * seqlen * dim + offs_d
    z_row = z_ptr + b * s_z_b + offs_d.to(tl.int64) * s_z_d
    chunk_stride = dim * dstate

    for kk in tl.static_range(2):
        k = 1 - kk  # direction 1 first: direction 0 reads its y back
        A0, A1, A2, A3, Dk, bias = _params(A_ptr, D_ptr, bias_ptr, s_A_k, s_A_d, s_A_n, s_D_k, s_D_d, s_bias_k,
                                           s_bias_d, k, dstate, offs_d, mask_d, STATE_J, N_GROUPS, BLOCK_D)
        # the state before this segment: the boundary pass's state after the previous segment in scan order
        e = seg - 1 + k  # hseg entry of that segment (entry e holds segment e + k)
        has_prev = (e >= 0) & (e < n_seg - 1)
        h0, h1, h2, h3 = _load_groups(hseg_ptr + ((b * 2 + k) * (n_seg - 1) + e) * chunk_stride, s_h_n, s_h_d,
                                      dstate, offs_d, mask_d, has_prev, STATE_J, N_GROUPS, BLOCK_D)
        _scan_direction(u_ptr + b * s_u_b + k * s_u_k + offs_d.to(tl.int64) * s_u_d,
                        delta_ptr + b * s_dt_b + k * s_dt_k + offs_d.to(tl.int64) * s_dt_d,
                        _packed_rows(bc_ptr, b * 2 + k, seqlen, offs_d, STATE_J, BLOCK_N), s_u_l, s_dt_l,
                        t_lo + k * (n_tok - 1), 1 - 2 * k, n_tok, h0, h1, h2, h3,
                        A0, A1, A2, A3, Dk, bias, dstate, offs_d, mask_d,
                        y1_row, z_row, s_z_l, out_row, ysum_row, dim,
                        states_ptr + (b * 2 + k) * (n_chunks - 1) * chunk_stride,
                        chunk_stride, s_h_n, s_h_d, seqlen,
                        k, DELTA_SOFTPLUS, STORE_STATES, CHUNK, BLOCK_N, STATE_J, N_GROUPS, UNROLL)


def channel_contiguous(batch: int, lead: tuple, dim: int, seqlen: int, device, dtype) -> torch.Tensor:
    """An empty (batch, *lead, dim, seqlen) tensor as a transposed view of (batch, *lead, seqlen, dim) memory: the
    layout the kernels write, a thread owning a channel, so that a warp's per-token store is one contiguous run
    (token-contiguous rows cost a sector per thread). in_proj's output and out_proj's input have it too."""
    return torch.empty(batch, *lead, seqlen, dim, device=device, dtype=dtype).transpose(-1, -2)


def direction_major(batch: int, dim: int, seqlen: int, device, dtype) -> torch.Tensor:
    """An empty (batch, 2, dim, seqlen) tensor as a view of (2, batch, seqlen, dim) memory: channel-contiguous, and
    each branch one (batch * seqlen, dim) matrix, which x_proj and dt_proj read and write as one GEMM a branch
    (``vim.kernels.reference.per_direction_matmul``). The conv's output and the gradients of u and delta have it."""
    return torch.empty(2, batch, seqlen, dim, device=device, dtype=dtype).permute(1, 0, 3, 2)


def scan_output(u: torch.Tensor) -> torch.Tensor:
    """The forward's output buffer for u (batch, 2, dim, seqlen): (batch, dim, seqlen) in u's dtype,
    channel-contiguous."""
    batch, _, dim, seqlen = u.shape
    return channel_contiguous(batch, (), dim, seqlen, u.device, u.dtype)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors the split plans fill: the device's, or an H100's off a GPU (the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == 'cuda' else H100_SMS


def scan_fwd(
        u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, delta_softplus: bool, chunk: int,
        store_states: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the forward pass. Shapes as ``bidirectional_scan_ref``; inputs may be strided views.

    Returns:
        out: (batch, dim, seqlen) in u's dtype, a transposed view of (batch, seqlen, dim) memory. states: (batch,
        2, n_chunks - 1, dim, dstate) fp32, each direction's state at token boundary ``(j + 1) x chunk`` as entry
        j (direction 0 after the tokens before it, direction 1 after those from it on); None unless
        ``store_states`` (inference needs none). ysum: the ungated y of both directions summed, as out (shape,
        layout, dtype), for the gate's gradient; None unless ``store_states``.
    """
    batch, _, dim, seqlen = u.shape
    dstate = A.shape[-1]
    dev = u.device
    sms = sm_count(dev)
    seg_len, n_seg = plan_segments(batch, dim, seqlen, chunk, sms)
    n_chunks = triton.cdiv(seqlen, chunk)
    block_n = triton.next_power_of_2(dstate)
    out = scan_output(u)
    ysum = scan_output(u) if store_states else out  # (not written without states)
    y1 = torch.empty(batch, seqlen, dim, device=dev, dtype=torch.float32)
    states = torch.empty(batch, 2, n_chunks - 1 if store_states else 0, dim, dstate, device=dev, dtype=torch.float32)
    hseg = torch.empty(batch, 2, n_seg - 1, dim, dstate, device=dev, dtype=torch.float32)
    dtsum = torch.empty(batch, 2, n_seg - 1, dim, device=dev, dtype=torch.float32)
    block_j = min(block_n, 4)
    groups = dict(BLOCK_N=block_n, STATE_J=block_j)
    bc = pack_bc(B, C, block_n)
    strides = dict(u=tensor_strides(u, 4), delta=tensor_strides(delta, 4), A=tensor_strides(A, 3),
                   D=tensor_strides(D, 2), bias=tensor_strides(delta_bias, 2), z=tensor_strides(z, 3))
    blocks = lambda meta: triton.cdiv(dim, meta['BLOCK_D'])  # noqa: E731
    if n_seg > 1:
        _segment_state_kernel[lambda meta: (blocks(meta) * batch * 2 * (n_seg - 1),)](
            u, delta, A, bc, delta_bias, hseg, dtsum,
            batch, seqlen, dim, dstate, seg_len, n_seg, 1, dstate,
            *strides['u'], *strides['delta'], *strides['A'], *strides['bias'],
            DELTA_SOFTPLUS=delta_softplus, **groups,
        )
        _segment_boundary_kernel[lambda meta: (blocks(meta) * batch * 2,)](
            A, hseg, dtsum, batch, dim, dstate, n_seg, 1, dstate, *strides['A'], REVERSE=0, **groups,
        )
    _scan_output_kernel[lambda meta: (blocks(meta) * n_seg * batch,)](
        u, delta, A, bc, D, z, delta_bias, out, ysum, y1, hseg, states,
        batch, seqlen, dim, dstate, seg_len, n_seg, 1, dstate,
        *strides['u'], *strides['delta'], *strides['A'], *strides['D'], *strides['bias'], *strides['z'],
        DELTA_SOFTPLUS=delta_softplus, STORE_STATES=store_states, CHUNK=chunk, **groups,
    )
    return (out, states, ysum) if store_states else (out, None, None)
