"""The 'cpu' backend behind the public ops: auto picks it for CPU tensors, a whole model through it matches the
reference backend, it stays one opaque op under torch.compile and flop counting, and a failed build falls back."""
from __future__ import annotations

import shutil
import warnings

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode
from vim.kernels import bidirectional_conv_silu, bidirectional_scan, interface, resolve_backend
from vim.kernels.cpu import bidirectional_scan_cpu, build

import vim  # noqa: F401  (registers the models)

needs_compiler = pytest.mark.skipif(shutil.which('c++') is None and shutil.which('g++') is None,
                                    reason='no C++ compiler')


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(interface.ENV_VAR, raising=False)


@needs_compiler
def test_auto_picks_cpu_for_cpu_tensors(no_env):
    assert 'cpu' in interface.available_backends()
    assert resolve_backend(None, torch.zeros(1)) == 'cpu'
    assert resolve_backend('cpu', torch.zeros(1)) == 'cpu'
    assert resolve_backend('reference', torch.zeros(1)) == 'reference'
    assert resolve_backend('auto', torch.zeros(1, device='meta')) == 'reference'
    with pytest.raises(RuntimeError, match="'cpu' runs on CPU tensors"):
        resolve_backend('cpu', torch.zeros(1, device='meta'))


def test_failed_build_falls_back_with_one_warning(no_env, monkeypatch):
    monkeypatch.setattr(build, '_result', (None, 'could not build the CPU kernels (no compiler)'))
    monkeypatch.setattr(build, '_warned', False)
    with pytest.warns(RuntimeWarning, match='no compiler.*reference'):
        assert resolve_backend('auto', torch.zeros(1)) == 'reference'
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert resolve_backend('auto', torch.zeros(1)) == 'reference'  # warned once per process
    with pytest.raises(RuntimeError, match="backend 'cpu'.*no compiler.*backend='reference'"):
        resolve_backend('cpu', torch.zeros(1))


@needs_compiler
@pytest.mark.parametrize('dtype, tol', [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_model_through_auto_matches_the_reference_backend(no_env, monkeypatch, dtype, tol):
    model = timm.create_model('test_vim', num_classes=5, drop_path_rate=0.0).to(dtype)
    x = torch.randn(2, 3, 64, 64, dtype=dtype)

    def forward_backward():
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out, grads = forward_backward()
    monkeypatch.setenv(interface.ENV_VAR, 'reference')
    ref, ref_grads = forward_backward()
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=tol, atol=tol * g.abs().max().item(), msg=name)


@needs_compiler
def test_compiles_without_graph_break_and_counts_flops():
    batch, dim, seqlen, N = 1, 16, 9, 4
    u, delta, z = (torch.randn(batch, 2, dim, seqlen, requires_grad=True) for _ in range(3))
    A = -torch.rand(2, dim, N) - 0.1
    B, C = torch.randn(batch, 2, N, seqlen), torch.randn(batch, 2, N, seqlen)
    D, bias = torch.randn(2, dim), torch.randn(2, dim)
    x, w, b = torch.randn(batch, dim, seqlen), torch.randn(2, dim, 4), torch.randn(2, dim)

    def f(u, delta, z):
        conv = bidirectional_conv_silu(x, w, b, backend='cpu')
        return bidirectional_scan(u * conv, delta, A, B, C, D, z[:, 0], bias, backend='cpu')

    compiled = torch.compile(f, backend='aot_eager', fullgraph=True)
    out = compiled(u, delta, z)
    out.sum().backward()
    grad = u.grad.clone()
    u.grad = None
    expected = f(u, delta, z)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad, u.grad, rtol=0, atol=0)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        bidirectional_scan_cpu(u, delta, A, B, C, D, z[:, 0], bias)
    assert counter.get_flop_counts()['Global'][torch.ops.vim.cpu_bidirectional_scan] == 9 * 2 * dim * seqlen * N


@pytest.mark.parametrize('slow', [True, False])
def test_a_slow_first_build_says_so(monkeypatch, caplog, slow):
    """The first build of the C++ kernels takes ~30 s: past SLOW_BUILD_NOTICE_S it is announced while it runs and
    timed; a cached load (well under a second) says nothing."""
    import time
    monkeypatch.setattr(build, '_result', None)  # as in a fresh process
    monkeypatch.setattr(build, 'SLOW_BUILD_NOTICE_S', 0.05 if slow else 60.0)
    seen = []

    class Module:
        @staticmethod
        def capability():
            return 'AVX2'
    monkeypatch.setattr(build, '_build', lambda: (time.sleep(0.3), seen.append(list(caplog.messages)), Module)[-1])
    with caplog.at_level('WARNING', logger='vim.kernels'):
        assert build.cpu_backend_status() == (True, 'C++ kernels built for AVX2')
    if slow:
        assert any('compiling the C++ CPU kernels' in m for m in seen[0])
        assert caplog.messages[-1].startswith('vim.kernels: done in ')
    else:
        assert caplog.messages == []
