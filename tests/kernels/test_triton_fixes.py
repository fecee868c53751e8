"""Fixes of issue 9 in the Triton kernels, each with a test that failed before it: softplus accurate in fp32, launch
grids that hold any batch (grid axes 1 and 2 stop at 65,535 programs), autotune keys that see the batch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip('triton')

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from vim.kernels.triton import AUTOTUNED_KERNELS, CONFIGS, bwd, conv, fwd, pack  # noqa: E402
from vim.kernels.triton.common import softplus  # noqa: E402

from tests.kernels.test_triton_interpreter import DEVICE  # noqa: E402


@triton.jit
def _softplus_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, softplus(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)


def test_softplus_is_accurate_in_fp32():
    """Within 2e-6 relative of float64 over [-30, 30]; log(1 + e^x) in fp32 is 2e-5 off at -8, 6e-2 at -15."""
    x = torch.cat([torch.linspace(-30, 30, 6001), torch.tensor([-15.0, -12.0, -8.0, 0.0, 1e-6, -1e-6, 20.0, 21.0])])
    x = x.to(DEVICE)
    y = torch.empty_like(x)
    _softplus_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    exact = torch.log1p(torch.exp(x.double()))
    rel = ((y.double() - exact).abs() / exact).max().item()
    assert rel <= 2e-6, rel
    torch.testing.assert_close(F.softplus(x.double()), exact, rtol=2e-6, atol=0)  # the reference (float64) too


class _GridRecorder:
    """Stands in for a kernel: records the launch grid of every config instead of launching."""

    def __init__(self, name, grids):
        self.name, self.grids = name, grids

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            for config in CONFIGS.get(self.name, [triton.Config({})]):
                g = grid(dict(kwargs, **config.kwargs)) if callable(grid) else grid
                self.grids.append((self.name, tuple(g)))
        return launch


def test_launch_grids_hold_a_batch_above_65535(monkeypatch):
    grids = []
    for module, name in ((fwd, '_segment_state_kernel'), (fwd, '_segment_boundary_kernel'),
                         (fwd, '_scan_output_kernel'), (bwd, '_segment_carry_kernel'),
                         (bwd, '_segment_boundary_kernel'), (bwd, '_bidirectional_scan_bwd_kernel'),
                         (bwd, '_gate_grad_kernel'),
                         (conv, '_bidirectional_conv_fwd_kernel'), (conv, '_bidirectional_conv_bwd_kernel'),
                         (pack, '_pack_bc_kernel')):
        monkeypatch.setattr(module, name, _GridRecorder(name, grids))
    monkeypatch.setattr(fwd, 'plan_segments', lambda *args: (2, 2))  # the split forward's launches too
    monkeypatch.setattr(bwd, 'plan_backward_segments', lambda *args: (2, 2))  # and the split backward's
    batch, dim, seqlen, dstate, chunk = 70_000, 2, 4, 2, 2
    f32 = dict(device=DEVICE)
    u, delta = torch.zeros(batch, 2, dim, seqlen, **f32), torch.zeros(batch, 2, dim, seqlen, **f32)
    A, D, bias = torch.zeros(2, dim, dstate, **f32), torch.zeros(2, dim, **f32), torch.zeros(2, dim, **f32)
    B, C = torch.zeros(batch, 2, dstate, seqlen, **f32), torch.zeros(batch, 2, dstate, seqlen, **f32)
    z, gout = torch.zeros(batch, dim, seqlen, **f32), torch.zeros(batch, dim, seqlen, **f32)
    _, states, ysum = fwd.scan_fwd(u, delta, A, B, C, D, z, bias, True, chunk)
    bwd.scan_bwd(gout, u, delta, A, B, C, D, z, bias, states, ysum, True, chunk)
    x, w, b = torch.zeros(batch, dim, seqlen, **f32), torch.zeros(2, dim, 4, **f32), torch.zeros(2, dim, **f32)
    conv.conv_fwd(x, w, b)
    conv.conv_bwd(torch.zeros(batch, 2, dim, seqlen, **f32), x, w, b)
    plain = {'_pack_bc_kernel', '_gate_grad_kernel'}
    assert {name for name, _ in grids} == {k.fn.__name__ for k in AUTOTUNED_KERNELS} | plain
    for name, grid in grids:
        assert grid[0] < 2**31 and all(g <= 65_535 for g in grid[1:]), (name, grid)


def test_autotune_keys_include_the_batch():
    """A batch-1 warm-up must not fix the config that a batch-64 training step runs."""
    for kernel in AUTOTUNED_KERNELS:
        assert 'batch' in kernel.keys, (kernel.fn.__name__, kernel.keys)


def test_token_offsets_within_a_chunk_fit_32_bits():
    """The backward's main kernel adds a chunk's token offsets (at most 7 tokens x the token stride) in 32 bits; an
    input whose token stride would overflow them is copied contiguous (token stride 1) first."""
    chunk = 8
    limit = (2**31 - 1) // (chunk - 1)  # the largest token stride whose 7 tokens fit
    strided = lambda stride: torch.empty(0, device='meta').as_strided((1, 4, 3), (0, 1, stride))  # noqa: E731
    fits = strided(limit)
    assert bwd.within_chunk_offsets(fits, chunk) is fits
    huge = strided(limit + 1)
    fixed = bwd.within_chunk_offsets(huge, chunk)
    assert fixed.stride(-1) == 1 and fixed.shape == huge.shape


def test_backward_fills_no_zero_gradients_for_the_saved_outputs():
    """The op's states and ysum outputs are saved for its backward and never differentiated: autograd must not
    materialise zero gradients of their size for it (a states-sized fill a layer, measured on an H100)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from vim.kernels.triton import bidirectional_scan_triton

    from tests.kernels.test_triton_interpreter import NAMES, make_inputs

    class Fills(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.zeros, torch.ops.aten.zeros_like, torch.ops.aten.zero_,
                                       torch.ops.aten.fill_, torch.ops.aten.new_zeros, torch.ops.aten.full):
                self.shapes.append(tuple(out.shape))
            return out

    x = make_inputs(1, 4, 16, 4, torch.float32)
    with Fills() as fills:  # a dispatch mode: the custom op's path (plain eager calls have no such outputs)
        out = bidirectional_scan_triton(*(x[n] for n in NAMES), chunk_size=4)
        out.backward(torch.ones_like(out))
    states = (1, 2, 16 // 4 - 1, 4, 4)  # (batch, direction, inner chunk boundaries, dim, dstate)
    assert states not in fills.shapes, fills.shapes
    assert tuple(out.shape) not in fills.shapes, fills.shapes  # ysum's
    assert all(x[n].grad is not None for n in NAMES)
