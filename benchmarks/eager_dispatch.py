"""The host's Python around one layer's Triton scan + conv, through the custom ops against the plain eager path
(vim.kernels.eager), with the kernel launches stubbed out: what the dispatch itself costs, on any machine.

    python benchmarks/eager_dispatch.py [--calls 1000]

CPU tensors under the Triton interpreter (set here), the launchers (scan_fwd, scan_bwd, conv_fwd, conv_bwd)
replaced by functions returning preallocated outputs, so nothing but the Python around them runs. Both paths in one
process, alternating, forward alone and forward + backward, microseconds per call (the median of the rounds).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time

os.environ['TRITON_INTERPRET'] = '1'  # before triton is imported: CPU tensors

import torch  # noqa: E402
import vim.kernels.triton.op as op  # noqa: E402
from vim.kernels.triton import fwd  # noqa: E402


def _stub_launchers(batch: int, dim: int, seqlen: int, dstate: int, inputs: tuple, conv_inputs: tuple) -> None:
    u = inputs[0]
    out, ysum = fwd.scan_output(u), fwd.scan_output(u)
    states = torch.empty(batch, 2, max(1, -(-seqlen // op.DEFAULT_CHUNK) - 1), dim, dstate)
    grads = [torch.empty_like(t) for t in inputs]
    y = torch.empty(batch, 2, dim, seqlen)
    conv_grads = tuple(torch.empty_like(t) for t in conv_inputs)
    op._scan_fwd = lambda *a, store_states=True: (out, *((states, ysum) if store_states else (None, None)))
    op._scan_bwd = lambda *a: grads
    op._conv_fwd = lambda *a: y
    op._conv_bwd = lambda *a: conv_grads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--calls', type=int, default=1000)
    p.add_argument('--rounds', type=int, default=3)
    args = p.parse_args(argv)
    batch, dim, seqlen, dstate = 1, 32, 16, 16

    def leaf(*shape):
        return torch.randn(*shape).requires_grad_()
    u, delta = (torch.randn(2, batch, seqlen, dim).permute(1, 0, 3, 2).requires_grad_() for _ in range(2))
    inputs = (u, delta, leaf(2, dim, dstate), leaf(batch, 2, dstate, seqlen), leaf(batch, 2, dstate, seqlen),
              leaf(2, dim), leaf(batch, dim, seqlen), leaf(2, dim))
    conv_inputs = (leaf(batch, dim, seqlen), leaf(2, dim, 4), leaf(2, dim))
    _stub_launchers(batch, dim, seqlen, dstate, inputs, conv_inputs)

    def eager(grad: bool) -> None:
        with torch.set_grad_enabled(grad):
            outs = (op.bidirectional_scan_triton(*inputs), op.bidirectional_conv_silu_triton(*conv_inputs))
            if grad:
                torch.autograd.grad(outs, inputs + conv_inputs, outs)

    def custom_ops(grad: bool) -> None:  # the path before vim.kernels.eager: checks, then the ops
        with torch.set_grad_enabled(grad):
            op._check_inputs(*inputs)
            op._check_conv_inputs(*conv_inputs)
            outs = (op._scan_op(*inputs, True, op.DEFAULT_CHUNK, grad)[0], op._conv_op(*conv_inputs))
            if grad:
                torch.autograd.grad(outs, inputs + conv_inputs, outs)

    print(f'{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, '
          f'torch {torch.__version__}, {args.calls} calls a round, median of {args.rounds} rounds')
    for grad in (False, True):
        times = {f: [] for f in (custom_ops, eager)}
        for _ in range(args.rounds):
            for f in times:
                for _ in range(50):
                    f(grad)
                start = time.perf_counter()
                for _ in range(args.calls):
                    f(grad)
                times[f].append((time.perf_counter() - start) / args.calls * 1e6)
        ops_us, eager_us = (statistics.median(times[f]) for f in (custom_ops, eager))
        what = 'forward + backward' if grad else 'forward'
        print(f'{what:18s}: custom ops {ops_us:6.1f} us, eager {eager_us:6.1f} us ({ops_us / eager_us:.2f}x)')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
