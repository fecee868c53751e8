"""The static report's SASS reader (vim.kernels.triton.sass) and occupancy rule on hand-written SASS: no compiler."""
from __future__ import annotations

from vim.kernels.triton.report import occupancy
from vim.kernels.triton.sass import parse_sass, spaced_issue_clocks, straight_line, token_loops

_SASS = """
        Function : kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;                 /* 0x00000a0000017a02 */
        /*0010*/                   S2R R0, SR_TID.X ;                     /* 0x0000000000007919 */
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;       /* 0x0000000402047981 */
        /*0030*/                   FMUL R8, R4, R5 ;                      /* 0x0000000504087220 */
        /*0040*/                   MUFU.EX2 R9, R8 ;                      /* 0x0000000800097308 */
        /*0050*/                   FFMA R10, R9, R10, R6 ;                /* 0x0000000a090a7223 */
        /*0060*/                   SHFL.BFLY PT, R11, R10, 0x1, 0x1f ;    /* 0x0c201f000a0b7f89 */
        /*0070*/               @P0 BRA 0xb0 ;                             /* 0x0000000000300947 */
        /*0080*/                   STG.E desc[UR4][R2.64], R10 ;          /* 0x0000000a02007986 */
        /*0090*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;          /* 0x0000000000007b1d */
        /*00a0*/                   NOP ;                                  /* 0x0000000000007918 */
        /*00b0*/               @P1 BRA 0x20 ;                             /* 0xffffffff00d81947 */
        /*00c0*/                   MUFU.RCP R12, R10 ;                    /* 0x0000000a000c7308 */
        /*00d0*/                   EXIT ;                                 /* 0x000000000000794d */
        /*00e0*/                   BRA 0xe0;                              /* 0xfffffffc00fc7947 */
"""


def test_token_loop_counts_and_conditional_region():
    instructions = parse_sass(_SASS)
    assert len(instructions) == 14  # NOP dropped
    (loop,) = token_loops(instructions)  # BRA 0xe0 -> 0xe0 is a self-loop without exp: not a token loop
    assert (loop.start, loop.end) == (0x20, 0xb0)
    assert loop.counts['all'] == 9 and loop.counts['ex2'] == 1 and loop.counts['mufu'] == 1
    assert loop.counts['shfl'] == 1 and loop.counts['bar'] == 1 and loop.counts['global_load'] == 1
    # the store and the barrier are jumped over by @P0 BRA 0xb0
    assert loop.conditional['all'] == 2 and loop.conditional['bar'] == 1 and loop.main_path['all'] == 7
    outside = straight_line(instructions, [loop])
    assert outside['all'] == 5 and outside['mufu'] == 1


def test_occupancy_by_registers():
    assert occupancy(32, 4, 0) == 1.0  # 64 warps fit
    assert occupancy(128, 4, 0) == 0.25  # 16 warps: 65,536 registers / (128 x 32)
    assert occupancy(225, 2, 0) == 0.125  # 232 allocated a thread: 8 warps of 2-warp blocks


def _body(opcodes: str) -> list:
    """Hand-made straight-line code: 'M' a MUFU.EX2, 'f' an FFMA."""
    text = {'M': 'MUFU.EX2 R1, R2', 'f': 'FFMA R3, R4, R5, R6'}
    return parse_sass('\n'.join(f'/*{16 * i:04x}*/    {text[c]} ;' for i, c in enumerate(opcodes)))


def test_spaced_issue_clocks_charges_bursts_of_exps():
    # 4 MUFU spread 8 apart issue at one a clock: 32 clocks, the body's length
    spread = _body('Mfffffff' * 4)
    assert spaced_issue_clocks(spread) == 32.0
    # the same 4 MUFU and 28 FFMA with the MUFU together: each waits for the unit, 3 x 7 clocks, and the body's FFMA
    # after them cannot fill the wait; the next pass's first MUFU is again 8 or more clocks after the last
    burst = _body('MMMM' + 'f' * 28)
    assert spaced_issue_clocks(burst) == 32.0 + 3 * 7
    # bound below by the exp unit: 4 MUFU and 4 FFMA a pass still take 32 clocks
    assert spaced_issue_clocks(_body('MfMfMfMf')) == 32.0
    # a burst at the end of one pass and the start of the next waits across the loop's back edge
    assert spaced_issue_clocks(_body('M' + 'f' * 14 + 'M')) == 16.0 + 7
