"""backend='mamba_ssm': both directions through mamba_ssm's selective_scan_fn and causal_conv1d's causal_conv1d_fn.

The packages are CUDA-only. On CPU, stand-ins are injected into sys.modules with the packages' semantics (a float64
token loop for the scan, a padded conv for the conv) and their input rules (dtypes, shapes, strides, widths), so
that the flips, the per-direction parameters and the merge are checked against the reference exactly as the real
packages would be called. With CUDA and the packages installed, the GPU tests use the real kernels as a second
oracle next to the reference, for the Triton kernels too.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
import vim.kernels.interface as interface
from vim.kernels import (
    available_backends,
    bidirectional_conv_silu,
    bidirectional_conv_silu_ref,
    bidirectional_scan,
    bidirectional_scan_ref,
    resolve_backend,
    selective_scan,
    selective_scan_ref,
)
from vim.kernels.mamba_ssm import bidirectional_conv_silu_mamba, bidirectional_scan_mamba
from vim.kernels.selfcheck import SCAN_NAMES, CheckCase, case_inputs

from tests.kernels.oracle import selective_scan_oracle

_ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fake_selective_scan_fn(calls):
    """mamba_ssm's selective_scan_fn on CPU: its checks (selective_scan.cpp), then a float64 token loop."""
    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
        batch, dim, seqlen = u.shape
        assert u.dtype in _ACTIVATION_DTYPES and all(t.dtype == u.dtype for t in (delta, B, C, z) if t is not None)
        assert all(t.dtype == torch.float32 for t in (A, D, delta_bias) if t is not None)
        assert A.shape == (dim, A.shape[1]) and B.shape == C.shape == (batch, A.shape[1], seqlen)
        assert delta.shape == u.shape and (z is None or z.shape == u.shape)
        assert D.shape == delta_bias.shape == (dim,)
        calls.append(dict(u=u, z=z, A=A))
        return selective_scan_oracle(u, delta, A, B, C, D, z, delta_bias, delta_softplus).to(u.dtype)
    return selective_scan_fn


def _fake_causal_conv1d_fn(calls):
    """causal_conv1d's causal_conv1d_fn on CPU: its checks (causal_conv1d.cpp), then a padded float64 conv."""
    def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                         final_states_out=None, activation=None):
        dim, width = weight.shape
        assert x.dtype in _ACTIVATION_DTYPES and weight.dtype in _ACTIVATION_DTYPES
        assert x.dim() == 3 and x.shape[1] == dim and 2 <= width <= 4
        assert x.stride(2) == 1 or x.stride(1) == 1
        assert bias.dtype == weight.dtype and bias.stride(-1) == 1 and bias.shape == (dim,)
        assert activation in ('silu', 'swish')
        calls.append(dict(x=x))
        y = F.conv1d(x.double(), weight.double().unsqueeze(1), bias.double(), padding=width - 1, groups=dim)
        return F.silu(y[..., :x.shape[-1]]).to(x.dtype)
    return causal_conv1d_fn


@pytest.fixture
def fake_packages(monkeypatch):
    """mamba_ssm and causal_conv1d stand-ins in sys.modules; returns the calls they receive."""
    calls = types.SimpleNamespace(scan=[], conv=[])
    interface_module = types.ModuleType('mamba_ssm.ops.selective_scan_interface')
    interface_module.selective_scan_fn = _fake_selective_scan_fn(calls.scan)
    conv_module = types.ModuleType('causal_conv1d')
    conv_module.causal_conv1d_fn = _fake_causal_conv1d_fn(calls.conv)
    for name, module in [('mamba_ssm', types.ModuleType('mamba_ssm')), ('mamba_ssm.ops', types.ModuleType('ops')),
                         ('mamba_ssm.ops.selective_scan_interface', interface_module), ('causal_conv1d', conv_module)]:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(interface, 'MAMBA_SSM_INSTALLED', True)
    return calls


def _exact_tolerance(dtype: torch.dtype) -> float:
    """The stand-ins compute in float64: what remains is rounding each direction's output (and gradient) to dtype."""
    return 2e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps


def _assert_close(actual, expected, tol, what):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale, msg=lambda m: f'{what}: {m}')


def _check_scan(fn, case: CheckCase, dtype, device='cpu', tol=None):
    """Output and the gradients of all eight inputs of ``fn`` against the float64 reference on the same values."""
    tol = _exact_tolerance(dtype) if tol is None else tol
    args = case_inputs(case, dtype, torch.device(device), seed=case.seqlen)[0]
    ref_args = [a.detach().double().cpu().requires_grad_() for a in args]
    y, y_ref = fn(*args), bidirectional_scan_ref(*ref_args)
    assert y.dtype == dtype and y.shape == y_ref.shape
    _assert_close(y.cpu(), y_ref, tol, 'output')
    gout = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(y, args, gout.to(device))
    for name, g, g_ref in zip(SCAN_NAMES, grads, torch.autograd.grad(y_ref, ref_args, gout.double())):
        _assert_close(g.cpu(), g_ref, tol, f'grad of {name}')


def _check_conv(fn, case: CheckCase, dtype, device='cpu', tol=None):
    tol = _exact_tolerance(dtype) if tol is None else tol
    args = case_inputs(case, dtype, torch.device(device), seed=case.seqlen)[1]
    ref_args = [a.detach().double().cpu().requires_grad_() for a in args]
    y, y_ref = fn(*args), bidirectional_conv_silu_ref(*ref_args)
    assert y.dtype == dtype and y.shape == y_ref.shape
    _assert_close(y.cpu(), y_ref, tol, 'output')
    gout = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    grads = torch.autograd.grad(y, args, gout.to(device))
    for name, g, g_ref in zip(('x', 'weight', 'bias'), grads, torch.autograd.grad(y_ref, ref_args, gout.double())):
        _assert_close(g.cpu(), g_ref, tol, f'grad of {name}')


CASES = [CheckCase(2, 6, 4, 9, layout='mixer'), CheckCase(1, 5, 3, 7, width=2)]


@pytest.mark.parametrize('case', CASES, ids=str)
def test_scan_through_the_official_call_matches_the_reference(fake_packages, case):
    _check_scan(bidirectional_scan_mamba, case, torch.float32)
    forward, backward = fake_packages.scan
    # the backward direction runs on the flipped sequence with its own A and the flipped gate, as Vim's model does
    args = case_inputs(case, torch.float32, torch.device('cpu'), seed=case.seqlen)[0]
    u, A, z = args[0], args[2], args[6]
    torch.testing.assert_close(backward['u'], u[:, 1].flip(-1).detach(), rtol=0, atol=0)
    torch.testing.assert_close(backward['z'], z.flip(-1).detach(), rtol=0, atol=0)
    torch.testing.assert_close(forward['z'], z.detach(), rtol=0, atol=0)
    torch.testing.assert_close(backward['A'], A[1].detach(), rtol=0, atol=0)


def test_scan_in_bf16_meets_the_kernels_dtype_rules(fake_packages):
    _check_scan(bidirectional_scan_mamba, CASES[0], torch.bfloat16)


@pytest.mark.parametrize('case', CASES, ids=str)
def test_conv_through_the_official_call_matches_the_reference(fake_packages, case):
    _check_conv(bidirectional_conv_silu_mamba, case, torch.float32)
    assert len(fake_packages.conv) == 2


def test_dispatch_by_argument_and_environment(fake_packages, monkeypatch):
    monkeypatch.setattr(interface, '_check_mamba_ssm', lambda x: None)  # the stand-ins run on CPU tensors
    assert 'mamba_ssm' in available_backends()
    scan_args, conv_args = case_inputs(CASES[0], torch.float32, torch.device('cpu'), seed=0)
    expected = bidirectional_scan_mamba(*scan_args)
    torch.testing.assert_close(bidirectional_scan(*scan_args, backend='mamba_ssm'), expected, rtol=0, atol=0)
    monkeypatch.setenv('VIM_SCAN_BACKEND', 'mamba_ssm')
    torch.testing.assert_close(bidirectional_scan(*scan_args), expected, rtol=0, atol=0)
    torch.testing.assert_close(bidirectional_conv_silu(*conv_args), bidirectional_conv_silu_mamba(*conv_args))
    u, delta, A, B, C, D, z, bias = scan_args
    u, delta, A, B, C, D, bias = u[:, 0], delta[:, 0], A[0], B[:, 0], C[:, 0], D[0], bias[0]  # one direction
    torch.testing.assert_close(selective_scan(u, delta, A, B, C, D, z, bias, True),
                               selective_scan_oracle(u, delta, A, B, C, D, z, bias, True).float())


def test_auto_never_picks_mamba_ssm(fake_packages, monkeypatch):
    monkeypatch.delenv('VIM_SCAN_BACKEND', raising=False)
    assert resolve_backend(None, torch.zeros(1)) == interface._auto_on_cpu() != 'mamba_ssm'


def test_clear_errors(monkeypatch):
    monkeypatch.setattr(interface, 'MAMBA_SSM_INSTALLED', False)
    assert 'mamba_ssm' not in available_backends()
    with pytest.raises(RuntimeError, match=r"needs the mamba_ssm package: pip install 'vim-backbones\[mamba\]'"):
        resolve_backend('mamba_ssm', torch.zeros(1))
    monkeypatch.setattr(interface, 'MAMBA_SSM_INSTALLED', True)
    with pytest.raises(RuntimeError, match='needs CUDA tensors, got cpu'):
        resolve_backend('mamba_ssm', torch.zeros(1))
    for missing in ('mamba_ssm', 'mamba_ssm.ops', 'mamba_ssm.ops.selective_scan_interface', 'causal_conv1d'):
        monkeypatch.setitem(sys.modules, missing, None)  # import fails
    scan_args, conv_args = case_inputs(CASES[0], torch.float32, torch.device('cpu'), seed=0)
    with pytest.raises(RuntimeError, match=r"needs the mamba_ssm package .*vim-backbones\[mamba\]"):
        bidirectional_scan_mamba(*scan_args)
    with pytest.raises(RuntimeError, match=r"needs the causal_conv1d package .*vim-backbones\[mamba\]"):
        bidirectional_conv_silu_mamba(*conv_args)
    x, weight, bias = conv_args
    with pytest.raises(ValueError, match='causal_conv1d supports conv widths 2 to 4, got 5'):
        bidirectional_conv_silu_mamba(x, torch.zeros(2, x.shape[1], 5), bias)


# ---- GPU: the real packages, a second oracle for the Triton kernels ----

GPU_CASES = [CheckCase(2, 384, 16, 197, layout='mixer'), CheckCase(1, 48, 16, 1025), CheckCase(3, 18, 5, 33)]


@pytest.fixture
def real_packages():
    pytest.importorskip('mamba_ssm')
    pytest.importorskip('causal_conv1d')


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize('case', GPU_CASES, ids=str)
def test_real_mamba_ssm_matches_the_reference(real_packages, case, dtype):
    from vim.kernels.selfcheck import tolerance

    _check_scan(bidirectional_scan_mamba, case, dtype, device='cuda', tol=tolerance(dtype))
    _check_conv(bidirectional_conv_silu_mamba, case, dtype, device='cuda', tol=tolerance(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize('case', GPU_CASES, ids=str)
def test_triton_matches_the_official_kernels(real_packages, case, dtype):
    """The two fast backends against each other: each within its tolerance of the reference, so within twice it."""
    pytest.importorskip('triton')
    from vim.kernels.selfcheck import tolerance
    from vim.kernels.triton import bidirectional_conv_silu_triton, bidirectional_scan_triton

    scan_args, conv_args = case_inputs(case, dtype, torch.device('cuda'), seed=7)
    tol = 2 * tolerance(dtype)
    for official, ours in [(bidirectional_scan_mamba(*scan_args), bidirectional_scan_triton(*scan_args)),
                           (bidirectional_conv_silu_mamba(*conv_args), bidirectional_conv_silu_triton(*conv_args))]:
        scale = official.abs().max().item()
        torch.testing.assert_close(ours.float(), official.float(), rtol=tol, atol=tol * scale)


def test_selective_scan_passes_return_last_state_to_mamba(monkeypatch):
    """selective_scan(..., return_last_state=True) on the mamba_ssm backend is mamba's own (out, last_state)."""
    seen = []

    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
        seen.append(return_last_state)
        out = selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True)
        return out if return_last_state else out[0]

    monkeypatch.setattr(interface, 'resolve_backend', lambda backend, x: backend)
    monkeypatch.setattr('vim.kernels.mamba_ssm._selective_scan_fn', lambda: selective_scan_fn)
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(2, 3, 7, generator=g), torch.rand(2, 3, 7, generator=g)
    A, B, C = -torch.rand(3, 4, generator=g), torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    out, last = selective_scan(u, delta, A, B, C, return_last_state=True, backend='mamba_ssm')
    ref_out, ref_last = selective_scan_ref(u, delta, A, B, C, return_last_state=True)
    assert seen == [True]
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(last, ref_last)
