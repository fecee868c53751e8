"""Static performance report of the Triton kernels, from their compiled code: no GPU needed.

Every autotune config of every kernel the ops launch is compiled for the H100 (sm_90, bf16, the model's input
views). From ptxas and the SASS it reports registers, spills, occupancy, and in the token loops the instructions,
MUFU (exp2), SHFL and BAR per (token, channel, state) (the conv's: per (token, channel)). It then predicts each
op's time for Vim-Ti and Vim-S shapes with an issue model and compares it with the floor ``max(bytes / 3.0 TB/s,
exps / (16 x 132 x 1.98 GHz))``. The ops: the scan's forward as training runs it (``scan_fwd``, saving states for
the backward) and as inference runs it (``scan_fwd_inference``), its backward, and the conv's forward and
backward.

The issue model, per kernel launch: each warp runs on one of the 528 sub-partitions (4 per SM), which issue one
instruction per clock and one MUFU instruction every 8 clocks (16 lanes per SM per clock); the warps spread evenly.
One warp of these sequential loops issues only about once every ``fwd.ISSUE_INTERVAL`` (6.6) clocks, measured on
an H100, so a sub-partition holding ``live`` warps at once (its share, capped by the occupancy) issues
``min(1, live / 6.6)`` a clock. A launch takes ``ceil(warps / 528) x max(instructions / that rate, 8 x MUFU
instructions)`` per warp, or its bytes at 3.0 TB/s if that is longer. Instructions outside the loops count once
per warp. On top, the exp unit's pace: ptxas gathers a token's exp2 into a burst, which a warp issuing in order
waits out (``sass.spaced_issue_clocks`` replays each loop; ``burst`` is its ratio to ``max(instructions, 8 x
MUFU)``), and the launch is charged ``1 + (burst - 1) x rate``: in full where the scheduler would issue every clock,
less where its warps wait on latency anyway. Calibrated on the fifth H100 run (benchmarks/README.md): per kernel
within 0.94-1.07x of the measured times at 8 x 6,085. Cache misses and launch gaps are ignored: this is a proxy, a
prediction; a GPU run decides. Beside each prediction, ``exp_unit_ratio``: the time the exp units alone need for
the MUFU instructions the launches issue, over the floor. That bound belongs to the design, not to the model: where
the sequence is split, the segment-state pass computes its segments' decays once more, so no scheduling brings such
an op below ``1 + (split tokens / all tokens)`` times the floor.

The compiled code depends on the Triton version: the installed one compiles (the report names it). Triton 3.6
(torch 2.11's) and 3.8 laid out the same forward differently, with shuffles and barriers in its token loops on 3.6
only (benchmarks/README.md). To read what a GPU machine's Triton makes, compile with that version beside yours:

    vim-kernel-report --json report.json            # or: python -m vim.kernels.triton.report
    pip download --no-deps triton==3.6.0 -d /tmp/w && pip install --no-deps --target /tmp/t36 /tmp/w/triton-*.whl
    PYTHONPATH=/tmp/t36 vim-kernel-report --json report-triton3.6.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .sass import (
    MUFU_CLOCKS,
    enclosing_loops,
    loop_body,
    own_body,
    parse_sass,
    spaced_issue_clocks,
    straight_line,
    token_loops,
)

__all__ = ['build_report', 'format_report', 'main', 'CASES', 'PEAK_BYTES_PER_S', 'EXP_PER_S']

SMS = 132
SLOTS = 4 * SMS  # warp schedulers (sub-partitions)
CLOCK_HZ = 1.98e9
PEAK_BYTES_PER_S = 3.0e12
EXP_PER_S = 16 * SMS * CLOCK_HZ
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
DSTATE, CHUNK, WIDTH, RANK = 16, 8, 4, 12  # CHUNK: op.DEFAULT_CHUNK
DTYPE_BYTES = 2  # bf16

# (name, d_inner, seqlen, batch): Vim-Ti and Vim-S at 224 px (197 tokens, batch 64) and 1248 px (6,085 tokens)
CASES = [('Vim-Ti 224px b64', 384, 197, 64), ('Vim-Ti 1248px b1', 384, 6085, 1), ('Vim-Ti 1248px b8', 384, 6085, 8),
         ('Vim-S 224px b64', 768, 197, 64), ('Vim-S 1248px b1', 768, 6085, 1), ('Vim-S 1248px b8', 768, 6085, 8)]


@dataclass
class Launch:
    """One kernel launch of an op for a case: its warps and what each does."""
    kernel: str
    warps: int
    loop_iterations: float  # per warp, over all its token loops (or segment / chunk loops)
    bytes: float


def _ceil(a: float, b: float) -> int:
    return int(-(-a // b))


def occupancy(registers: int, num_warps: int, shared: int) -> float:
    """Resident warps per SM / 64 (registers allocated per warp in units of 256, 32 blocks, 227 KiB shared)."""
    per_warp = _ceil(registers * 32, 256) * 256
    blocks = min(REGISTERS_PER_SM // (per_warp * num_warps), 32, MAX_WARPS_PER_SM // num_warps,
                 (227 * 1024) // shared if shared else 32)
    return blocks * num_warps / MAX_WARPS_PER_SM


def _specs():
    """(kernel name, autotuner or jit function, configs, loop kind, tokens per loop iteration, constexprs)."""
    import triton

    from . import bwd, conv, fwd, pack
    from .aot import KernelSpec
    from .common import all_configs
    scan = dict(DELTA_SOFTPLUS=True, STORE_STATES=True, CHUNK=CHUNK, BLOCK_N=DSTATE, STATE_J=4, REVERSE=0)

    class _Plain:  # a kernel without autotuning, seen as an autotuner of its one launch config
        def __init__(self, fn):
            self.fn = fn

    return [
        (KernelSpec('pack_bc', _Plain(pack._pack_bc_kernel), [triton.Config({}, num_warps=4)], 'none',
                    dict(BLOCK_L=pack.PACK_BLOCK_L, BLOCK_N=DSTATE)), 1),
        (KernelSpec('segment_state', fwd._segment_state_kernel, all_configs(fwd._STATE_CONFIGS), 'token', scan), 1),
        (KernelSpec('segment_boundary', fwd._segment_boundary_kernel, all_configs(fwd._BOUNDARY_CONFIGS),
                    'segment', scan), 1),
        (KernelSpec('scan_output', fwd._scan_output_kernel, all_configs(fwd._OUTPUT_CONFIGS), 'token', scan), 1),
        # inference (no autograd): the output pass saves no states for a backward
        (KernelSpec('scan_output_inference', fwd._scan_output_kernel, all_configs(fwd._OUTPUT_CONFIGS), 'token',
                    dict(scan, STORE_STATES=False)), 1),
        (KernelSpec('segment_carry', bwd._segment_carry_kernel, all_configs(bwd._CARRY_CONFIGS), 'token', scan), 1),
        # the backward's main kernel: one compile and launch per direction (direction 1 first)
        *((KernelSpec(f'scan_bwd_k{k}', bwd._bidirectional_scan_bwd_kernel, all_configs(bwd._CONFIGS), 'state',
                      dict(scan, K=k)), CHUNK) for k in (1, 0)),
        (KernelSpec('gate_grad', _Plain(bwd._gate_grad_kernel), [triton.Config({}, num_warps=bwd.GATE_WARPS)], 'none',
                    dict(BLOCK_L=bwd.GATE_BLOCK_L, BLOCK_D=bwd.GATE_BLOCK_D)), 1),
        (KernelSpec('conv_fwd', conv._bidirectional_conv_fwd_kernel, all_configs(conv._FWD_CONFIGS), 'conv',
                    dict(WIDTH=WIDTH)), 1),
        (KernelSpec('conv_bwd', conv._bidirectional_conv_bwd_kernel, all_configs(conv._BWD_CONFIGS), 'conv',
                    dict(WIDTH=WIDTH)), 1),
    ]


def _analyse(spec, tokens_per_iteration: int, config, compiled: dict) -> dict:
    """Per-config numbers from the compiled code: registers, occupancy, token-loop counts per element."""
    instructions = parse_sass(compiled['sass'])
    loops = token_loops(instructions) if spec.loop != 'none' else []
    # 'state': the exp loop walks the states of one chunk (CHUNK tokens a thread), inside the chunk loop, whose own
    # body (per-token inputs, gradients of u, delta, z) runs once a chunk
    around = enclosing_loops(instructions, loops) if spec.loop == 'state' else [None] * len(loops)
    threads = 32 * config.num_warps
    block_d = config.kwargs.get('BLOCK_D', 1)
    # elements (token, channel, state) a thread handles per loop iteration
    if spec.loop == 'token':
        tokens_per_iteration = config.kwargs.get('UNROLL', tokens_per_iteration)
        per_iteration = tokens_per_iteration * max(block_d / threads, 1) * DSTATE
    elif spec.loop == 'state':  # counted per chunk iteration: the chunk loop's own body + DSTATE state iterations
        per_iteration = CHUNK * max(block_d / threads, 1) * DSTATE
    elif spec.loop == 'segment':  # BLOCK_S segment boundaries of one (channel, state) a thread
        per_iteration = max(block_d * DSTATE / threads, 1) * config.kwargs['BLOCK_S']
    elif spec.loop == 'conv':  # UNROLL tokens of the thread's channels (no state axis)
        per_iteration = config.kwargs['UNROLL'] * max(block_d / threads, 1)
    else:  # straight-line code (the B/C packing: a tile of (token, state))
        per_iteration = max(block_d / threads, 1) * DSTATE
    unroll = 1.0
    if spec.loop in ('segment', 'conv') and loops:
        # an unrolled loop (the conv's by UNROLL in the source, the boundary walk's by ptxas) and its remainder loop:
        # the unrolled body (the most exp2) is the loop, the remainder's few iterations count as straight-line code
        loops = [max(loops, key=lambda lp: lp.main_path['ex2'])]
        around = [None]
        if spec.loop == 'segment':  # one exp2 an element: the body's source iterations
            unroll = max(loops[0].main_path['ex2'] / per_iteration, 1.0)
    rows = []
    for lp, outer in zip(loops, around):
        main, cond = lp.main_path, lp.conditional
        # conditional code in a token loop is the chunk-state store: it runs for one token in CHUNK
        weight = 1 / CHUNK if spec.loop == 'token' else 1.0
        executed = {c: main[c] + weight * cond[c] for c in ('all', 'mufu', 'ex2', 'shfl', 'bar', 'global_load',
                                                            'global_store', 'shared', 'fp32')}
        if outer is not None:
            executed = {c: outer.counts[c] + DSTATE * v for c, v in executed.items()}
        executed = {c: v / unroll for c, v in executed.items()}
        # one warp's clocks for the main path at the exp unit's pace; the chunk loop's own body, straight-line code
        # around the state loop, adds its clocks once a chunk
        spaced = spaced_issue_clocks(loop_body(instructions, lp))
        if outer is not None:
            spaced = spaced_issue_clocks(own_body(instructions, outer, lp)) + DSTATE * spaced
        spaced /= unroll
        paced = max(executed['all'], MUFU_CLOCKS * executed['mufu'])
        rows.append(dict(start=hex(lp.start), end=hex(lp.end), body=lp.instructions, unrolled=unroll,
                         conditional=cond['all'], spaced_clocks=round(spaced, 2),
                         burst=round(max(1.0, spaced / paced), 3),
                         per_iteration={c: round(v, 2) for c, v in executed.items()},
                         per_element={c: round(v / per_iteration, 3) for c, v in executed.items()},
                         shfl_in_loop=lp.counts['shfl'], bar_in_loop=lp.counts['bar'],
                         **({} if outer is None else dict(chunk_body=outer.counts['all'],
                                                          shfl_in_chunk_body=outer.counts['shfl'],
                                                          bar_in_chunk_body=outer.counts['bar']))))
    outside = straight_line(instructions, loops + [o for o in around if o is not None])
    return dict(kernel=spec.name, config=dict(config.kwargs, num_warps=config.num_warps,
                                              num_stages=config.num_stages),
                registers=compiled['registers'], spill_stores=compiled['spill_stores'],
                spill_loads=compiled['spill_loads'], shared=compiled['shared'],
                occupancy=round(occupancy(compiled['registers'], config.num_warps, compiled['shared']), 3),
                total_instructions=len(instructions), outside_loops=outside['all'],
                outside_mufu=outside['mufu'], loops=rows, elements_per_iteration=per_iteration)


def _warp_clocks(row: dict, iterations_per_loop: float) -> tuple[float, float]:
    """(issue clocks, MUFU clocks) of one warp doing ``iterations_per_loop`` iterations of each of its loops."""
    issue = row['outside_loops'] + sum(lp['per_iteration']['all'] for lp in row['loops']) * iterations_per_loop
    mufu = row['outside_mufu'] + sum(lp['per_iteration']['mufu'] for lp in row['loops']) * iterations_per_loop
    return issue, MUFU_CLOCKS * mufu


def burst(row: dict) -> float:
    """How much longer a warp of this config takes through its loops at the exp unit's pace (``spaced_clocks``)
    than the model's ``max(instructions, 8 x MUFU)``: the loops' factors weighted by their instructions."""
    weight = sum(lp['per_iteration']['all'] for lp in row['loops'])
    return sum(lp['burst'] * lp['per_iteration']['all'] for lp in row['loops']) / weight if weight else 1.0


def _launch_time(row: dict, warps: int, iterations_per_loop: float, nbytes: float) -> float:
    """Seconds of one launch: each scheduler's warps issue their instructions at ``min(1, live / ISSUE_INTERVAL)``
    a clock, live = the warps it holds at once (its share of the launch, at most what the occupancy allows), or
    their MUFU work, or the bytes at the copy bandwidth, whichever is longest (bytes only for a launch of no
    warps of ours: a torch reduction)."""
    from .fwd import _pass_time, issue_rate  # the same issue model the forward's segment planner minimises
    issue, mufu = _warp_clocks(row, iterations_per_loop)
    # warps a sub-partition holds at once (the occupancy is rounded to 3 decimals: 0.312 for 20 warps an SM)
    resident = max(1, round(row['occupancy'] * MAX_WARPS_PER_SM) // 4)
    clocks = max(_pass_time(warps, issue, resident, SLOTS), _ceil(warps, SLOTS) * mufu) if warps else 0.0
    # the exp bursts' wait, in full where the scheduler's warps keep it issuing every clock, less where they wait
    # on latency anyway (rate < 1): the 5th GPU run measured 1.44-1.50x the issue model for the three loops whose
    # bursts replay at 1.45-1.52x, and 1.00x for the backward's main kernel (3 warps, rate 0.45, burst 1.11-1.12)
    rate = issue_rate(min(resident, _ceil(warps, SLOTS))) if warps else 0.0
    clocks *= 1 + (burst(row) - 1) * rate
    return max(clocks / CLOCK_HZ, nbytes / PEAK_BYTES_PER_S)


def _exp_unit_time(row: dict, warps: int, iterations_per_loop: float) -> float:
    """Seconds the exp units alone need for the MUFU instructions of one launch, spread evenly over all 528
    schedulers (one warp-wide MUFU each every 8 clocks): a lower bound for the launch whatever the scheduling."""
    return warps * _warp_clocks(row, iterations_per_loop)[1] / SLOTS / CLOCK_HZ if warps else 0.0


def _floors(dim: int, seqlen: int, batch: int) -> dict:
    """The floor of each op: compulsory bytes at 3.0 TB/s vs one exp per (token, channel, state, direction). The
    conv's bytes: x and both branches' outputs (forward); x, both branches' output gradients and x's (backward)."""
    e, tokens = DTYPE_BYTES, batch * seqlen
    exps = 2 * tokens * dim * DSTATE
    fwd_bytes = tokens * (dim * e * (2 * 2 + 1 + 1) + 2 * 2 * DSTATE * e)  # u, delta (2 dirs), z, out; B, C
    bwd_bytes = tokens * (dim * e * (2 * 2 + 2 + 2 * 2 + 1) + 2 * 2 * DSTATE * e * 2)  # + gout; gu, gdelta, gz; gB, gC
    exp_time = exps / EXP_PER_S
    fwd = max(fwd_bytes / PEAK_BYTES_PER_S, exp_time)
    return dict(scan_fwd=fwd, scan_fwd_inference=fwd, scan_bwd=max(bwd_bytes / PEAK_BYTES_PER_S, exp_time),
                conv_fwd=tokens * dim * e * 3 / PEAK_BYTES_PER_S, conv_bwd=tokens * dim * e * 4 / PEAK_BYTES_PER_S,
                exps=exps, exp_time=exp_time)


def _op_launches(op: str, row_of: Callable, dim: int, seqlen: int, batch: int) -> list[tuple[dict, Launch]]:
    """The launches of ``op`` for a case, each with the config row it runs (row_of(kernel) -> best row)."""
    from . import bwd
    from .conv import conv_block_tokens
    from .fwd import plan_segments
    e, tokens = DTYPE_BYTES, batch * seqlen
    seg, n_seg = plan_segments(batch, dim, seqlen, CHUNK)
    bseg, bn_seg = bwd.plan_backward_segments(batch, dim, seqlen, CHUNK)
    n_chunks = _ceil(seqlen, CHUNK)

    def warps(row, programs_per_block_d):
        cfg = row['config']
        return programs_per_block_d(_ceil(dim, cfg.get('BLOCK_D', 1))) * cfg['num_warps']

    def split_passes(side, seg, n_seg, inputs):
        """B and C packed, then, if the sequence is split, the side pass (reading ``inputs`` values per (token,
        channel) and the packed B or C) and the boundary walk."""
        r = row_of('pack_bc')
        out = [(r, Launch('pack_bc', _ceil(seqlen, 64) * batch * 2 * 4, 0, tokens * 2 * 2 * DSTATE * (e + 8)))]
        if n_seg > 1:
            r = row_of(side)
            out.append((r, Launch(side, warps(r, lambda nb: nb * batch * 2 * (n_seg - 1)), seg,
                                  batch * 2 * (seqlen - seg) * (inputs * dim * e + DSTATE * 4)
                                  + batch * 2 * n_seg * dim * (DSTATE + 1) * 4)))
            r = row_of('segment_boundary')
            out.append((r, Launch('segment_boundary', warps(r, lambda nb: nb * batch * 2),
                                  _ceil(n_seg - 1, r['config']['BLOCK_S']),
                                  batch * 2 * n_seg * dim * (2 * DSTATE + 1) * 4)))
        return out

    out = []
    if op in ('scan_fwd', 'scan_fwd_inference'):
        out += split_passes('segment_state', seg, n_seg, 2)  # u, delta
        kernel = 'scan_output' if op == 'scan_fwd' else 'scan_output_inference'
        r = row_of(kernel)
        # per warp: seg tokens in each direction; the loops are unrolled by UNROLL tokens. Per (token, channel): u,
        # delta (both directions), z, out, direction 1's y (fp32, written and read back); per token the packed B
        # and C; with autograd the states saved every CHUNK tokens and the ungated y (ysum)
        unroll = r['config'].get('UNROLL', 1)
        states = batch * 2 * n_chunks * DSTATE * dim * 4 + tokens * dim * e if op == 'scan_fwd' else 0
        out.append((r, Launch(kernel, warps(r, lambda nb: nb * n_seg * batch), seg / unroll,
                              tokens * (dim * (4 * e + e + e + 8) + 2 * 2 * DSTATE * 4) + states)))
    elif op == 'scan_bwd':
        groups = _ceil(dim, 32)
        out += split_passes('segment_carry', bseg, bn_seg, 3)  # delta, z, gout
        # per (token, channel): u, delta both directions, z and gout once per direction, gu, gdelta, the saved
        # states; per token: packed B, C and the gB, gC partials. One launch per direction, each with half of those
        # bytes. Then the gate's gradient from the saved ysum, z and gout: tiles of (token, channel), 4 warps each.
        for k in (1, 0):
            r = row_of(f'scan_bwd_k{k}')
            out.append((r, Launch(f'scan_bwd_k{k}', warps(r, lambda nb: nb * bn_seg * batch), _ceil(bseg, CHUNK),
                                  tokens * (dim * (e * 12 + 2 * DSTATE * 4 / CHUNK)
                                            + 2 * 2 * DSTATE * 4 * (1 + groups)) / 2)))
        out.append((row_of('gate_grad'), Launch('gate_grad', _ceil(seqlen, bwd.GATE_BLOCK_L)
                                                * _ceil(dim, bwd.GATE_BLOCK_D) * batch * bwd.GATE_WARPS, 0,
                                                tokens * dim * 4 * e)))
        # the partials summed over channel groups and cast (torch): bytes only
        out.append((row_of('pack_bc'), Launch('bc_partials_sum', 0, 0, tokens * 2 * 2 * DSTATE * (4 * groups + e))))
    elif op in ('conv_fwd', 'conv_bwd'):
        r = row_of(op)
        block_l = conv_block_tokens(batch, dim, seqlen, SMS)
        n_blocks = _ceil(seqlen, block_l)
        programs = n_blocks * _ceil(dim, r['config']['BLOCK_D']) * batch
        # per program the block's edges, loaded by both neighbours (conv.py): 7 tokens of x in the forward; 10 of x
        # and 3 of each output gradient in the backward (whose 3 steps before its loop are straight-line code, in
        # the row's instructions outside the loop)
        iterations = block_l / r['config']['UNROLL']
        if op == 'conv_fwd':  # x, both outputs
            nbytes = tokens * dim * e * 3 + batch * n_blocks * dim * 7 * e
        else:  # x, both output gradients, x's; the weight and bias partials written, then read by the torch sums
            nbytes = (tokens * dim * e * 4 + batch * n_blocks * dim * (10 + 2 * 3) * e
                      + 2 * batch * n_blocks * 2 * dim * (WIDTH + 1) * 4)
        out.append((r, Launch(op, programs * r['config']['num_warps'], iterations, nbytes)))
    return out


def _best_row(by_kernel: dict, op: str, kernel: str, dim: int, seqlen: int, batch: int) -> dict:
    """The config of ``kernel`` the autotuner should pick if the model were right: the fastest for this case."""
    def time_of(row):
        launches = _op_launches(op, lambda k: row if k == kernel else by_kernel[k][0], dim, seqlen, batch)
        return sum(_launch_time(r, la.warps, la.loop_iterations, la.bytes) for r, la in launches
                   if la.kernel == kernel)
    return min(by_kernel[kernel], key=time_of)


def _predict(rows: list[dict]) -> list[dict]:
    from .bwd import plan_backward_segments
    from .fwd import plan_segments
    by_kernel: dict[str, list[dict]] = {}
    for r in rows:
        if 'error' not in r:
            by_kernel.setdefault(r['kernel'], []).append(r)
    results = []
    for name, dim, seqlen, batch in CASES:
        floors = _floors(dim, seqlen, batch)
        seg, n_seg = plan_segments(batch, dim, seqlen, CHUNK)
        bseg, bn_seg = plan_backward_segments(batch, dim, seqlen, CHUNK)
        case = dict(case=name, dim=dim, seqlen=seqlen, batch=batch, dstate=DSTATE, dtype='bf16', segments=n_seg,
                    segment_length=seg, backward_segments=bn_seg, backward_segment_length=bseg, exps=floors['exps'],
                    ops={})
        for op in ('scan_fwd', 'scan_fwd_inference', 'scan_bwd', 'conv_fwd', 'conv_bwd'):
            def best_row(kernel, op=op, dim=dim, seqlen=seqlen, batch=batch):
                return _best_row(by_kernel, op, kernel, dim, seqlen, batch)
            launches = _op_launches(op, best_row, dim, seqlen, batch)
            parts = [dict(kernel=la.kernel, config=r['config'], warps=la.warps,
                          predicted_us=round(1e6 * _launch_time(r, la.warps, la.loop_iterations, la.bytes), 2),
                          bytes=int(la.bytes)) for r, la in launches]
            predicted = sum(p['predicted_us'] for p in parts)
            floor_us = 1e6 * floors[op]
            # what the exp units need for the exps these kernels issue: the design's own lower bound (a split
            # computes its decays twice, softplus and silu add theirs), which no scheduling can beat
            exp_unit_us = 1e6 * sum(_exp_unit_time(r, la.warps, la.loop_iterations) for r, la in launches)
            case['ops'][op] = dict(predicted_us=round(predicted, 2), floor_us=round(floor_us, 2),
                                   ratio=round(predicted / floor_us, 2), exp_unit_us=round(exp_unit_us, 2),
                                   exp_unit_ratio=round(exp_unit_us / floor_us, 2), launches=parts)
        results.append(case)
    return results


def compile_all(layouts=(('bf16', 'mixer'),), progress: bool = False) -> list[dict]:
    """Compile every config of every kernel for sm_90 (each dtype/layout pair) and analyse it."""
    import torch

    from .aot import compile_kernel, conv_arguments, scan_arguments
    dtypes = {'bf16': torch.bfloat16, 'fp32': torch.float32, 'fp16': torch.float16}
    rows = []
    for spec, tokens_per_iteration in _specs():
        for config in spec.configs:
            for dtype, layout in layouts:
                row = dict(kernel=spec.name, function=spec.autotuner.fn.__name__, dtype=dtype, layout=layout,
                           config=dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages))
                start = time.perf_counter()
                try:
                    if spec.name.startswith('conv'):
                        values = conv_arguments(dtypes[dtype], layout, 8, 384, 197, WIDTH)
                    else:
                        values = scan_arguments(dtypes[dtype], layout, 8, 384, DSTATE, 197, 64, 4, RANK)
                    compiled = compile_kernel(spec, config, values)
                    row.update(_analyse(spec, tokens_per_iteration, config, compiled),
                               lost_carries=compiled['lost_carries'])
                except Exception as e:  # reported; the tests fail on it
                    row['error'] = f'{type(e).__name__}: {e}'[-3000:]
                row['compile_s'] = round(time.perf_counter() - start, 2)
                if progress:
                    print(f"compiled {spec.name} {row['config']} {dtype}/{layout} in {row['compile_s']} s",
                          file=sys.stderr, flush=True)
                rows.append(row)
    return rows


def build_report(layouts=(('bf16', 'mixer'),), progress: bool = False) -> dict:
    """The whole report: device model, per-config compiled numbers, and per-case predictions (bf16 rows)."""
    import torch
    import triton

    from .fwd import ISSUE_INTERVAL
    rows = compile_all(layouts, progress)
    return dict(kind='prediction from compiled code (no GPU run)', target='sm_90 (H100 SXM)',
                date=datetime.date.today().isoformat(), triton=triton.__version__, torch=torch.__version__,
                model=dict(sms=SMS, clock_hz=CLOCK_HZ, bytes_per_s=PEAK_BYTES_PER_S, exp_per_s=EXP_PER_S,
                           mufu_clocks_per_warp_instruction=MUFU_CLOCKS, issue_per_clock_per_subpartition=1,
                           clocks_between_one_warps_issues=ISSUE_INTERVAL),
                kernels=rows,
                cases=_predict([r for r in rows if r['dtype'] == 'bf16' and r['layout'] == 'mixer']))


def format_report(report: dict) -> str:
    """A readable table: kernels and configs, then predictions per case."""
    lines = [f"Static report ({report['kind']}), target {report['target']}, triton {report['triton']}", '',
             'kernel            config                        regs spill occ   loop instr/elem  ex2/elem  mufu/elem'
             '  shfl  bar  burst']
    for r in report['kernels']:
        if r.get('dtype') != 'bf16':
            continue
        cfg = ','.join(f'{k}={v}' for k, v in r['config'].items() if k != 'num_stages')
        if 'error' in r:
            lines.append(f"{r['kernel']:<17} {cfg:<29} ERROR {r['error'][:80]}")
            continue
        loops = r['loops'] or [dict(per_element={}, shfl_in_loop=0, bar_in_loop=0)]
        for i, lp in enumerate(loops):
            pe = lp['per_element']
            head = (f"{r['kernel']:<17} {cfg:<29} {r['registers']:>4} {r['spill_stores']:>5} {r['occupancy']:>4.2f}"
                    if i == 0 else ' ' * 62)
            if pe:
                lines.append(f"{head}  {i:>3} {pe['all']:>11.2f} {pe['ex2']:>9.3f} {pe['mufu']:>10.3f}"
                             f" {lp['shfl_in_loop']:>5} {lp['bar_in_loop']:>4} {lp.get('burst', 1.0):>6.2f}")
            else:
                lines.append(f"{head}    - (no token loop: {r['total_instructions']} instructions a thread)")
    lines += ['', 'case                 op        predicted us   floor us   ratio   exp unit   segments']
    for c in report['cases']:
        for op, v in c['ops'].items():
            segments = (c['backward_segments'] if op == 'scan_bwd' else
                        c['segments'] if op.startswith('scan_fwd') else '')
            lines.append(f"{c['case']:<20} {op:<9} {v['predicted_us']:>12.2f} {v['floor_us']:>10.2f} "
                         f"{v['ratio']:>7.2f} {v['exp_unit_ratio']:>10.2f}   {segments}")
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='vim-kernel-report', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--json', help='write the report as JSON here (atomically)')
    parser.add_argument('--all-layouts', action='store_true',
                        help='also compile fp32 contiguous inputs (the compile test does; the predictions use bf16)')
    parser.add_argument('--quiet', action='store_true', help='no progress lines')
    args = parser.parse_args(argv)
    if os.environ.get('TRITON_INTERPRET', '0') not in ('', '0'):
        parser.error('unset TRITON_INTERPRET: the report compiles the kernels, the interpreter cannot')
    layouts = (('bf16', 'mixer'), ('fp32', 'contiguous')) if args.all_layouts else (('bf16', 'mixer'),)
    report = build_report(layouts, progress=not args.quiet)
    print(format_report(report))
    if args.json:
        tmp = f'{args.json}.tmp'
        with open(tmp, 'w') as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.json)
    failed = [r for r in report['kernels'] if 'error' in r]
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
