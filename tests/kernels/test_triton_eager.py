"""Plain eager calls of the Triton scan and conv run their kernels past the custom ops' dispatch
(vim.kernels.eager): the same bits and gradients as through the ops, which everything that can observe the
difference (a dispatch mode, torch.compile, FakeTensors) still gets."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip('triton')

import vim.kernels.triton.op as triton_op  # noqa: E402
from vim.kernels.triton import bidirectional_conv_silu_triton, bidirectional_scan_triton  # noqa: E402

from tests.kernels.test_triton_interpreter import DEVICE, NAMES, make_inputs  # noqa: E402


class PassthroughMode(TorchDispatchMode):
    """A dispatch mode that changes nothing: with it active the public functions take the custom ops."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _conv_inputs():
    g = torch.Generator().manual_seed(3)
    return {name: torch.randn(*shape, generator=g).to(DEVICE).requires_grad_()
            for name, shape in (('x', (2, 70, 11)), ('weight', (2, 70, 4)), ('bias', (2, 70)))}


def _run(recompute: bool, grad: bool):
    x, conv = make_inputs(2, 5, 19, 4, torch.bfloat16, layout='mixer'), _conv_inputs()
    with torch.set_grad_enabled(grad):
        out = bidirectional_scan_triton(*(x[n] for n in NAMES), chunk_size=4, recompute_states=recompute)
        y = bidirectional_conv_silu_triton(**conv)
    if not grad:
        return (out, y), ()
    g = torch.Generator().manual_seed(4)
    gout = (torch.randn(out.shape, generator=g).to(DEVICE, out.dtype), torch.randn(y.shape, generator=g).to(DEVICE))
    grads = torch.autograd.grad((out, y), [x[n] for n in NAMES] + list(conv.values()), gout)
    return (out, y), grads


@pytest.mark.parametrize('recompute, grad', [(False, False), (False, True), (True, True)])
def test_eager_calls_match_the_custom_ops_bit_for_bit(recompute, grad, monkeypatch):
    """On CUDA too: tests/kernels/test_triton_gpu.py runs this check there."""
    check_eager_matches_ops(recompute, grad, monkeypatch)


def check_eager_matches_ops(recompute: bool, grad: bool, monkeypatch) -> None:
    with PassthroughMode() as mode:
        outs_op, grads_op = _run(recompute, grad)
    assert 'vim.triton_bidirectional_scan' in mode.ops and 'vim.triton_bidirectional_conv_silu' in mode.ops
    if grad:
        assert any(op.startswith('vim.triton_bidirectional_scan_bwd') for op in mode.ops)

    def no_op(*args, **kwargs):
        raise AssertionError('plain eager went through a custom op')
    for name in ('_scan_op', '_conv_op', '_scan_bwd_op', '_scan_bwd_recompute_op', '_conv_bwd_op'):
        monkeypatch.setattr(triton_op, name, no_op)
    outs, grads = _run(recompute, grad)
    for a, b in zip(outs + grads, outs_op + grads_op):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)
    assert all(t.requires_grad == grad for t in outs)


def test_profiler_names_the_direct_calls():
    x = make_inputs(1, 4, 6, 2, torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = bidirectional_scan_triton(*(x[n] for n in NAMES))
        bidirectional_conv_silu_triton(**_conv_inputs())
        out.sum().backward()
    keys = {e.key for e in prof.key_averages()}
    assert {'vim::triton_bidirectional_scan', 'vim::triton_bidirectional_conv_silu'} <= keys


def test_dispatch_benchmark_runs():
    """benchmarks/eager_dispatch.py stubs this module's launchers by name: it must keep running as they change (its
    timings are its own business, not this test's)."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[2] / 'benchmarks' / 'eager_dispatch.py'
    run = subprocess.run([sys.executable, str(script), '--calls', '20', '--rounds', '1'], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if 'custom ops' in line and 'eager' in line]
    assert [r.split(':')[0].strip() for r in rows] == ['forward', 'forward + backward'], run.stdout
