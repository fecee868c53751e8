"""Reading SASS (cuobjdump -sass text): instructions, loops, and what the token loops issue.

A loop is the address range from a backward branch's target to the branch. The token loops are the innermost loops
that issue MUFU.EX2 (the decays). Inside a loop, code that a branch jumps forward over is counted apart as
conditional (in the scan's token loop: the store of a chunk state, once every CHUNK tokens).

``spaced_issue_clocks`` replays a loop body as one warp issues it, in order, against the exp unit's pace: a
sub-partition starts a warp-wide MUFU instruction at most every MUFU_CLOCKS (8) clocks. ptxas gathers a token's
exp2 together (16 MUFU.EX2 within ~50 instructions), so a warp reaching them waits for the unit while it has
nothing else to issue; the static report charges that wait (report.py).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

__all__ = ['Instruction', 'Loop', 'parse_sass', 'token_loops', 'enclosing_loops', 'straight_line', 'loop_body',
           'own_body', 'spaced_issue_clocks', 'MUFU_CLOCKS']

_LINE = re.compile(r'/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);')
_TARGET = re.compile(r'0x([0-9a-f]+)')
MUFU_CLOCKS = 8  # a warp's MUFU instruction holds its sub-partition's 4 special-function lanes for 8 clocks


@dataclass
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. MUFU.EX2, LDG.E.128
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split('.')[0]


@dataclass
class Loop:
    start: int
    end: int  # address of the backward branch
    counts: Counter = field(default_factory=Counter)  # by category, every instruction of the body
    conditional: Counter = field(default_factory=Counter)  # the part inside forward-branch-skipped regions

    @property
    def instructions(self) -> int:
        return self.counts['all']

    @property
    def main_path(self) -> Counter:
        return self.counts - self.conditional


def parse_sass(sass: str) -> list[Instruction]:
    """Instructions of the (single) kernel in ``sass``, in address order; NOPs dropped."""
    out = []
    for line in sass.splitlines():
        m = _LINE.search(line)
        if m and m.group(3) != 'NOP':
            out.append(Instruction(int(m.group(1), 16), m.group(3), m.group(4)))
    return out


def categorize(ins: Instruction) -> list[str]:
    cats = ['all']
    if ins.opcode.startswith('MUFU'):
        cats.append('mufu')
        if ins.opcode == 'MUFU.EX2':
            cats.append('ex2')
    if ins.base == 'SHFL':
        cats.append('shfl')
    if ins.base == 'BAR':
        cats.append('bar')
    if ins.base in ('LDG', 'LD'):
        cats.append('global_load')
    if ins.base in ('STG', 'ST', 'RED', 'ATOM', 'ATOMG'):
        cats.append('global_store')
    if ins.base in ('LDS', 'STS', 'LDSM'):
        cats.append('shared')
    if ins.base in ('FFMA', 'FMUL', 'FADD', 'FMNMX', 'FSEL', 'FSETP'):
        cats.append('fp32')
    return cats


def _count(instructions: list[Instruction]) -> Counter:
    c = Counter()
    for ins in instructions:
        c.update(categorize(ins))
    return c


def _branches(instructions):
    for ins in instructions:
        if ins.base == 'BRA':
            m = _TARGET.search(ins.operands)
            if m:
                yield ins, int(m.group(1), 16)


def _skipped(body: list[Instruction], end: int) -> set[int]:
    """Addresses of ``body`` that a forward branch inside it jumps over (code that runs conditionally)."""
    skipped = set()
    for ins, target in _branches(body):
        if ins.address < target <= end:
            skipped.update(i.address for i in body if ins.address < i.address < target)
    return skipped


def loop_body(instructions: list[Instruction], loop: Loop) -> list[Instruction]:
    """The main path of ``loop``: its instructions in address order without the conditional code."""
    body = [i for i in instructions if loop.start <= i.address <= loop.end]
    skipped = _skipped(body, loop.end)
    return [i for i in body if i.address not in skipped]


def own_body(instructions: list[Instruction], outer: Loop, inner: Loop) -> list[Instruction]:
    """The instructions of ``outer`` in address order without those of ``inner`` (a loop inside it)."""
    return [i for i in instructions
            if outer.start <= i.address <= outer.end and not inner.start <= i.address <= inner.end]


def spaced_issue_clocks(body: list[Instruction], mufu_clocks: int = MUFU_CLOCKS) -> float:
    """Clocks one warp takes to issue ``body`` once, run as a loop, in order, one instruction a clock, each MUFU
    instruction starting ``mufu_clocks`` or more after the one before it (also across iterations): the steady state
    of the third pass. Nothing else is modelled (no operand latency, no other warp). At least ``len(body)`` and
    ``mufu_clocks x`` its MUFU instructions; more where they come in bursts."""
    mufu = [ins.opcode.startswith('MUFU') for ins in body]
    clock, free_at, start = 0, -mufu_clocks, 0
    for _ in range(3):
        start = clock
        for is_mufu in mufu:
            if is_mufu:
                clock = max(clock, free_at + mufu_clocks)
                free_at = clock
            clock += 1
    return float(clock - start)


def token_loops(instructions: list[Instruction]) -> list[Loop]:
    """Innermost loops that issue MUFU.EX2, each with its instruction counts (see the module docstring)."""
    loops = [(target, ins.address) for ins, target in _branches(instructions) if target < ins.address]
    with_exp = [(s, e) for s, e in loops
                if any(i.opcode == 'MUFU.EX2' and s <= i.address <= e for i in instructions)]
    innermost = [(s, e) for s, e in with_exp
                 if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in with_exp)]
    result = []
    for s, e in sorted(set(innermost)):
        body = [i for i in instructions if s <= i.address <= e]
        skipped = _skipped(body, e)  # the code a forward branch inside the body jumps over
        result.append(Loop(s, e, _count(body), _count([i for i in body if i.address in skipped])))
    return result


def enclosing_loops(instructions: list[Instruction], loops: list[Loop]) -> list[Loop]:
    """For each of ``loops``, the smallest loop around it, counting only its own body (the inner loop left out): in
    the backward kernel the token loop is the loop over states, and this is the chunk loop around it."""
    spans = [(target, ins.address) for ins, target in _branches(instructions) if target < ins.address]
    result = []
    for lp in loops:
        around = [(s, e) for s, e in spans if s <= lp.start and lp.end <= e and (s, e) != (lp.start, lp.end)]
        if not around:
            result.append(Loop(lp.start, lp.end))
            continue
        s, e = min(around, key=lambda se: se[1] - se[0])
        result.append(Loop(s, e, _count(own_body(instructions, Loop(s, e), lp))))
    return result


def straight_line(instructions: list[Instruction], loops: list[Loop]) -> Counter:
    """Counts of the instructions outside ``loops`` (prologue, epilogue; an upper bound on what runs once)."""
    return _count([i for i in instructions if not any(lp.start <= i.address <= lp.end for lp in loops)])
