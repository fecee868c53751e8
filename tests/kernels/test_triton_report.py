"""Budgets on the static report of the Triton kernels (vim.kernels.triton.report, compiled once per session for sm_90
by the ``sm90_report`` fixture; skipped only where triton's sm_90 toolchain is missing).

The report's numbers are predictions from the compiled code (an issue model, no GPU). Issue 9's budgets are the
targets: forward predicted <= 1.5x its floor, backward <= 2.5x, no SHFL or BAR in a token loop, no spills. Where the
current kernels miss a target, the case is an expected failure (strict: it fails once the target is met, so the
marker gets removed) and the reason says why; the design's own properties are asserted exactly.
"""
from __future__ import annotations

import pytest

pytest.importorskip('triton')

FWD_BUDGET, BWD_BUDGET = 1.5, 2.5
FORWARD_KERNELS = ('segment_state', 'scan_output', 'scan_output_inference')
# the forward's design per (token, channel, state) in its token loops: one exp2 (+ softplus and silu per token), and
# few enough instructions that the exp unit, not issue, is the limit within 1.5x (8 issue slots per MUFU op)
MAX_MUFU_PER_ELEMENT = 1.25
MAX_INSTRUCTIONS_PER_ELEMENT = 1.5 * 8 * MAX_MUFU_PER_ELEMENT


def _rows(report, kernel):
    return [r for r in report['kernels'] if r['kernel'] == kernel and r['dtype'] == 'bf16' and 'error' not in r]


@pytest.mark.parametrize('kernel', FORWARD_KERNELS)
def test_forward_token_loops_have_no_shuffles_or_barriers(sm90_report, kernel):
    rows = _rows(sm90_report, kernel)
    assert rows
    for r in rows:
        assert r['loops'], f"{kernel} {r['config']}: no token loop found in the SASS"
        for lp in r['loops']:
            assert lp['shfl_in_loop'] == 0 and lp['bar_in_loop'] == 0, (kernel, r['config'], lp)


@pytest.mark.parametrize('kernel', FORWARD_KERNELS)
def test_forward_token_loops_issue_one_exp_per_element(sm90_report, kernel):
    for r in _rows(sm90_report, kernel):
        for lp in r['loops']:
            pe = lp['per_element']
            assert 1.0 <= pe['ex2'] <= MAX_MUFU_PER_ELEMENT, (kernel, r['config'], pe)
            assert pe['mufu'] <= MAX_MUFU_PER_ELEMENT, (kernel, r['config'], pe)
            assert pe['all'] <= MAX_INSTRUCTIONS_PER_ELEMENT, (kernel, r['config'], pe)


def test_boundary_walk_scans_inside_each_thread(sm90_report):
    """The boundary walk composes a block of segment entries by an associative scan along the tile axis that each
    thread holds whole: no SHFL or BAR in its loop, one exp2 per (segment, channel, state), whatever the config.
    (Triton 3.6 lays the tile out with lanes along the entries and compiles the loop with SHFL, no BAR:
    benchmarks/README.md; this checks the installed Triton.)"""
    rows = _rows(sm90_report, 'segment_boundary')
    assert rows
    for r in rows:
        assert len(r['loops']) == 1, (r['config'], r['loops'])
        lp = r['loops'][0]
        assert lp['shfl_in_loop'] == 0 and lp['bar_in_loop'] == 0, (r['config'], lp)
        assert lp['per_element']['ex2'] == 1.0, (r['config'], lp)


def _ratios(report, op):
    return {c['case']: c['ops'][op]['ratio'] for c in report['cases']}


@pytest.mark.xfail(strict=True, reason='predicted 3.9-5.7x on Triton 3.8, 3.9-6.2x on 3.6, inference 3.7-5.6x '
                   'and 3.7-6.0x (2026-11-27-m reports; an H100 measured 3.7-5.9x in bf16, fifth and seventh runs). '
                   'Where the sequence is split (1248 px; Vim-Ti at 224 px b64) the exp units alone need 2.0-2.3x '
                   'the floor, the report\'s exp_unit_ratio: the segment-state pass computes the decays a second '
                   'time, so no scheduling meets 1.5x there. Unsplit (1.15x) the schedulers idle: a warp of these '
                   'loops issues about once every 6.6 clocks (measured on an H100, 2026-11-26), a scheduler holds at '
                   'most 5 of the output pass, ptxas gathers each token\'s 16 exp2 into a burst that the exp unit '
                   'serialises (1.4-1.5x, measured), and the loops issue ~8-12 instructions per element against 9 '
                   'issue slots per exp (benchmarks/README.md)')
def test_forward_within_budget(sm90_report):
    ratios = {**_ratios(sm90_report, 'scan_fwd'), **{f'{k} (inference)': v
                                                    for k, v in _ratios(sm90_report, 'scan_fwd_inference').items()}}
    assert all(r <= FWD_BUDGET for r in ratios.values()), ratios


@pytest.mark.xfail(strict=True, reason='predicted 11.5-14.3x on Triton 3.8, 11.5-14.7x on 3.6 (2026-11-27-m '
                   'reports; an H100 measured 11.8-13.9x in bf16, fifth and seventh runs; the exp units alone need '
                   '1.35-2.53x, 2.53x at 1248 px batch 1 where the carry pass recomputes): ~35 instructions per '
                   'element against 8 issue slots per exp, and 168 registers leave 3 warps a scheduler, each issuing '
                   'once every ~6.6 clocks (benchmarks/README.md)')
def test_backward_within_budget(sm90_report):
    ratios = _ratios(sm90_report, 'scan_bwd')
    assert all(r <= BWD_BUDGET for r in ratios.values()), ratios


def test_backward_state_loop_design(sm90_report):
    """The backward's loop over states (bwd.py): one exp2 per (token, channel, state) shared by the state recompute
    and the reverse pass (softplus' and the sigmoids' exps per token come on top, at most 6 over 16 states), no
    spills, at most MAX_REGISTERS (3 warps a scheduler), and as its only cross-lane work the two per-(token, state)
    channel sums, reduced together by a reduce-scatter over the warp's lanes: 2 SHFL per element (2 CHUNK a state
    iteration), no barrier, none in the chunk loop around it."""
    from vim.kernels.triton import bwd
    from vim.kernels.triton.op import DEFAULT_CHUNK
    by_direction = [_rows(sm90_report, f'scan_bwd_k{k}') for k in (1, 0)]  # one compile and launch per direction
    assert all(by_direction)
    rows = by_direction[0] + by_direction[1]
    for r in rows:
        assert r['elements_per_iteration'] == DEFAULT_CHUNK * 16, r['elements_per_iteration']  # the report's CHUNK
        assert r['spill_stores'] == 0 and r['loops'], r['config']
        # capped by ptxas (bwd.MAX_REGISTERS) at 3 warps a scheduler: 12 an SM of its one-warp programs
        assert r['registers'] <= bwd.MAX_REGISTERS and round(r['occupancy'] * 64) >= 12, (r['dtype'], r['registers'])
        for lp in r['loops']:
            pe = lp['per_element']
            assert 1.0 <= pe['ex2'] <= 1.0 + 6 / 16, (r['config'], pe)
            assert lp['shfl_in_loop'] == 2 * DEFAULT_CHUNK and lp['bar_in_loop'] == 0, (r['config'], lp)
            assert lp['shfl_in_chunk_body'] == 0 and lp['bar_in_chunk_body'] == 0, (r['config'], lp)


@pytest.mark.parametrize('kernel, loads', [('conv_fwd', 1), ('conv_bwd', 3)])
def test_conv_token_loop_design(sm90_report, kernel, loads):
    """The conv walks tokens with a register window (conv.py): per (token, channel) each input is loaded once (x;
    x and both branches' output gradients), one exp2 per branch (silu, silu'), no SHFL or BAR."""
    rows = _rows(sm90_report, kernel)
    assert rows
    for r in rows:
        assert len(r['loops']) == 1, (r['config'], r['loops'])
        lp = r['loops'][0]
        pe = lp['per_element']
        assert lp['shfl_in_loop'] == 0 and lp['bar_in_loop'] == 0, (r['config'], lp)
        assert pe['ex2'] == 2.0 and pe['global_load'] == loads, (r['config'], pe)


@pytest.mark.parametrize('op, budget', [('conv_fwd', FWD_BUDGET), ('conv_bwd', BWD_BUDGET)])
def test_conv_within_budget(sm90_report, op, budget):
    ratios = _ratios(sm90_report, op)
    assert all(r <= budget for r in ratios.values()), ratios


# the forward's passes: two warps for each of the 528 schedulers; the backward's (3 resident a scheduler at 168
# registers, so its planner stops splitting sooner): a warp for each and two for the busiest
@pytest.mark.parametrize('op, passes, segments, min_warps', [
    ('scan_fwd', ('segment_state', 'scan_output'), 'segments', 2 * 4 * 132),
    ('scan_bwd', ('segment_carry', 'scan_bwd_k1', 'scan_bwd_k0'), 'backward_segments', 4 * 132 + 1)])
def test_fills_the_gpu_at_batch_one(sm90_report, op, passes, segments, min_warps):
    """At 1248 px batch 1 the forward and the backward split the sequence over the schedulers (one warp a scheduler
    ran 95x the floor on an H100)."""
    for c in sm90_report['cases']:
        if c['batch'] == 1 and c['seqlen'] > 1000:
            assert c[segments] > 1, c
            for la in c['ops'][op]['launches']:
                if la['kernel'] in passes:
                    assert la['warps'] >= min_warps, (c['case'], la)


def test_issue_model_runs_a_schedulers_share_in_waves():
    """Warps of equal work finish together, so a scheduler's share beyond what it holds runs as a second wave at the
    few leftover warps' own rate. The fifth H100 run measured both sides: the backward's main kernel at 8 x 6,085
    (4 warps a scheduler) took as long holding 3 warps as holding 2, and at 128 x 197 (3 a scheduler) 1.6x less
    time once 3 fit in one wave."""
    from vim.kernels.triton import fwd
    slots, work = 528, 1000.0

    def time(per_slot, resident):
        return fwd._pass_time(per_slot * slots, work, resident, slots)
    assert time(4, 3) == pytest.approx(time(4, 2))
    assert time(3, 2) == pytest.approx(2 * time(3, 3))
    # below ISSUE_INTERVAL warps a wave takes one warp's latency however many it holds; above, its issue slots
    assert time(1, 3) == pytest.approx(time(3, 3)) == pytest.approx(fwd.ISSUE_INTERVAL * work)
    assert time(12, 12) == pytest.approx(12 * work)


def test_token_loops_are_replayed_at_the_exp_units_pace(sm90_report):
    """Every analysed loop carries its replay (``spaced_clocks``, sass.spaced_issue_clocks): never less than the
    model's max(instructions, 8 x MUFU) a pass, so its ``burst`` factor is at least 1."""
    rows = [r for r in sm90_report['kernels'] if 'error' not in r and r['loops']]
    assert {r['kernel'] for r in rows} >= {'segment_state', 'scan_output', 'segment_carry', 'scan_bwd_k0', 'conv_fwd'}
    for r in rows:
        for lp in r['loops']:
            paced = max(lp['per_iteration']['all'], 8 * lp['per_iteration']['mufu'])
            assert lp['spaced_clocks'] >= paced - 0.01 and lp['burst'] >= 1.0, (r['kernel'], r['config'], lp)


def test_issue_model_charges_exp_bursts_where_the_scheduler_is_busy():
    """A config whose loop replays at the exp unit's pace 1.5x slower than max(instructions, 8 x MUFU) (``burst``)
    costs 1.5x at full issue and less where latency idles the scheduler anyway: 1 + 0.5 x rate. Calibrated on the
    fifth H100 run (benchmarks/README.md): the three exp-dense token loops measured 1.44-1.50x the issue model, their
    replays 1.45-1.52x; the backward's main kernel (rate 0.45, burst 1.12) 1.00x."""
    from vim.kernels.triton import fwd, report
    loop = dict(per_iteration=dict(all=100.0, mufu=10.0), burst=1.0)
    row = dict(outside_loops=0, outside_mufu=0, occupancy=0.5, loops=[loop])  # 8 warps a scheduler
    busy, idle = 528 * 8, 528 * 1

    def time(warps, factor):
        loop['burst'] = factor
        return report._launch_time(row, warps, 50, 0)
    assert report.burst(row) == 1.0
    assert time(busy, 1.5) == pytest.approx(1.5 * time(busy, 1.0))
    rate = 1 / fwd.ISSUE_INTERVAL
    assert time(idle, 1.5) == pytest.approx((1 + 0.5 * rate) * time(idle, 1.0))
    # loops weigh in by their instructions
    row['loops'] = [dict(per_iteration=dict(all=300.0, mufu=0.0), burst=1.0),
                    dict(per_iteration=dict(all=100.0, mufu=10.0), burst=2.0)]
    assert report.burst(row) == pytest.approx(1.25)


def test_exp_unit_time_spreads_the_mufu_work_over_all_schedulers():
    """The exp units' bound of a launch: its warps' MUFU instructions (loops and straight-line code), 8 clocks each,
    spread over the 528 schedulers, whatever the issue rate or the bytes."""
    from vim.kernels.triton import report
    row = dict(outside_loops=40, outside_mufu=2, occupancy=0.5,
               loops=[dict(per_iteration=dict(all=100.0, mufu=10.0), burst=1.5)])
    mufu_per_warp = 2 + 10 * 50
    assert report._exp_unit_time(row, 2 * 528, 50) == pytest.approx(2 * 8 * mufu_per_warp / report.CLOCK_HZ)
    assert report._exp_unit_time(row, 0, 50) == 0.0


def test_exp_unit_bound_counts_every_pass(sm90_report):
    """Each scan op's ``exp_unit_us`` covers the exps of all its launches: at least one per element (the floor's),
    never above the prediction, and in a split forward the segment-state pass's second exp for every token outside
    each direction's last segment. That is why issue 9's 1.5x cannot be met by a design that splits the sequence and
    recomputes the decays: the split forward's exp units alone need 2.0-2.3x the floor."""
    for c in sm90_report['cases']:
        for op in ('scan_fwd', 'scan_fwd_inference', 'scan_bwd'):
            v = c['ops'][op]
            assert v['floor_us'] <= v['exp_unit_us'] <= v['predicted_us'], (c['case'], op, v)
        if c['segments'] > 1:
            split = (c['seqlen'] - c['segment_length']) / c['seqlen']
            for op in ('scan_fwd', 'scan_fwd_inference'):
                v = c['ops'][op]
                assert v['exp_unit_us'] >= (1 + split) * v['floor_us'], (c['case'], op, split, v)


@pytest.mark.parametrize('plan', ['forward', 'backward'])
@pytest.mark.parametrize('batch, seqlen', [(1, 6085), (1, 16385), (8, 6085), (64, 197), (128, 197), (512, 197),
                                           (1, 197), (3, 70), (2, 4097)])
def test_segment_plan(batch, seqlen, plan):
    """Whole chunks of at least MIN_SEGMENT tokens that cover the sequence; where one warp a scheduler would be all
    the batch gives and the sequence is long enough, a split that gives every scheduler a warp and the busiest ones
    two (or all they can hold, if fewer); none where the batch alone gives each scheduler as many warps as it can
    hold (a split then adds the side pass's work and cannot raise the issue rate)."""
    from vim.kernels.triton import bwd, fwd
    chunk, dim = 8, 384
    planner, resident = ((fwd.plan_segments, fwd.RESIDENT_OUTPUT) if plan == 'forward' else
                         (bwd.plan_backward_segments, bwd.RESIDENT_MAIN))
    seg, n_seg = planner(batch, dim, seqlen, chunk)
    assert seg % chunk == 0 and (n_seg - 1) * seg < seqlen <= n_seg * seg
    assert n_seg == 1 or seg >= fwd.MIN_SEGMENT
    warps = batch * dim // 32 * n_seg
    if batch * dim // 32 <= 4 * 132 and batch * dim // 32 * (seqlen // fwd.MIN_SEGMENT) >= 2 * 4 * 132:
        # (where segments of MIN_SEGMENT tokens could give every scheduler two warps)
        assert warps >= 4 * 132 and -(-warps // (4 * 132)) >= min(2, resident), (seg, n_seg)
    if batch * dim // 32 >= resident * 4 * 132:
        assert n_seg == 1, (seg, n_seg)


def _plan_by_every_length(batch, dim, seqlen, chunk, sms, main_cost, main_resident, side_cost, side_resident):
    """The plan's definition: the least modelled time over every allowed segment length, longest first, the first
    of equal cost kept."""
    import triton
    from vim.kernels.triton import fwd
    units, slots, best = batch * triton.cdiv(dim, 32), fwd.SUBPARTITIONS_PER_SM * sms, None
    for seg in range(triton.cdiv(seqlen, chunk) * chunk, 0, -chunk):
        n_seg = triton.cdiv(seqlen, seg)
        if n_seg > 1 and seg < fwd.MIN_SEGMENT:
            break
        tokens = min(seg, seqlen)
        cost = fwd._pass_time(units * n_seg, 2 * main_cost * tokens, main_resident, slots)
        if n_seg > 1:
            cost += (fwd._pass_time(units * 2 * (n_seg - 1), side_cost * tokens, side_resident, slots)
                     + fwd._split_time(batch, dim, n_seg))
        if best is None or cost < best[0]:
            best = (cost, seg, n_seg)
    return best[1], best[2]


def test_plan_visits_few_lengths_and_finds_the_same_plan():
    """The planner runs on the host before every launch (walking all 761 lengths of 8 x 6,085 tokens took 13.5 ms a
    call on a 2-vCPU VM, more than the forward's kernels take on an H100): it skips lengths that cannot win and
    caches, and must still pick what the walk over every length picks."""
    import random

    from vim.kernels.triton import bwd, fwd
    weights = [(1.0, fwd.RESIDENT_OUTPUT, fwd._STATE_PASS_COST, fwd.RESIDENT_STATE),
               (bwd._MAIN_COST, bwd.RESIDENT_MAIN, bwd._CARRY_COST, bwd.RESIDENT_CARRY)]
    rng = random.Random(0)
    cases = [(b, d, seqlen, chunk, 132) for b in (1, 3, 64) for d in (10, 384) for chunk in (2, 8, 32)
             for seqlen in (1, 7, 64, 65, 197, 1025, 6085)]
    cases += [(rng.randint(1, 200), rng.randint(1, 2000), rng.randint(1, 20000), rng.choice((4, 8, 16, 128)),
               rng.choice((132, 114, 16, 1))) for _ in range(60)]
    for case in cases:
        for w in weights:
            assert fwd.plan_split.__wrapped__(*case, *w) == _plan_by_every_length(*case, *w), (case, w)
    fwd.plan_split.cache_clear()
    fwd.plan_segments(8, 384, 6085, 8)
    fwd.plan_segments(8, 384, 6085, 8)
    assert fwd.plan_split.cache_info().hits == 1


def test_report_is_a_prediction_with_its_floor(sm90_report):
    assert 'prediction' in sm90_report['kind']
    for c in sm90_report['cases']:
        for op, v in c['ops'].items():
            assert v['floor_us'] > 0 and v['predicted_us'] > 0 and v['launches'], (c['case'], op)


@pytest.mark.parametrize('op, planner', [('scan_fwd', 'plan_segments'), ('scan_bwd', 'plan_backward_segments')])
def test_planner_agrees_with_the_report(sm90_report, op, planner, monkeypatch):
    """The split planner runs a cheaper model than the report (no compiled code on the host): for every case its
    plan's predicted time must be within 5% of the best of the report's over a sweep of segment lengths. (Before
    it counted the segment states' memory traffic it split Vim-S 1248 px b8 into 109 segments, 8% slower than 16.)"""
    from vim.kernels.triton import bwd, fwd, report
    rows = [r for r in sm90_report['kernels'] if r['dtype'] == 'bf16' and r['layout'] == 'mixer' and 'error' not in r]
    planned = {c['case']: c['ops'][op]['predicted_us'] for c in report._predict(rows)}
    best = dict(planned)
    module = fwd if planner == 'plan_segments' else bwd
    for seg in (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 6088):
        monkeypatch.setattr(module, planner, lambda b, d, L, ch, sms=132, seg=seg: (min(seg, -(-L // ch) * ch),
                                                                                  -(-L // seg)))
        for c in report._predict(rows):
            best[c['case']] = min(best[c['case']], c['ops'][op]['predicted_us'])
    assert all(planned[k] <= 1.05 * best[k] for k in planned), {k: (planned[k], best[k]) for k in planned}
