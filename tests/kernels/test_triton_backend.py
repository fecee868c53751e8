"""Dispatch to the triton backend: auto on CUDA tensors, explicit anywhere it can run, clear errors where it cannot."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip('triton')

import vim.kernels.interface as interface  # noqa: E402
import vim.kernels.triton.op as triton_op  # noqa: E402
from vim.kernels import (  # noqa: E402
    available_backends,
    bidirectional_conv_silu,
    bidirectional_scan,
    resolve_backend,
    selective_scan,
)
from vim.kernels.cpu import cpu_backend_status  # noqa: E402
from vim.kernels.triton import bidirectional_conv_silu_triton, bidirectional_scan_triton  # noqa: E402

from tests.kernels.test_triton_interpreter import DEVICE, NAMES, make_inputs  # noqa: E402


def _args():
    x = make_inputs(1, 4, 3, 2, torch.float32, seed=11)
    return [x[n].detach() for n in NAMES]


def test_auto_picks_triton_for_cuda_tensors_only(monkeypatch):
    assert 'triton' in available_backends()
    u = torch.zeros(1, 2, 4, 3, device=DEVICE)
    monkeypatch.delenv('VIM_SCAN_BACKEND', raising=False)
    cpu_auto = 'cpu' if cpu_backend_status()[0] else 'reference'  # CPU tensors, even under the interpreter
    auto = 'triton' if u.is_cuda else cpu_auto
    assert resolve_backend(None, u) == auto
    assert resolve_backend('auto', u) == auto
    assert resolve_backend('auto', torch.zeros(1)) == cpu_auto
    assert resolve_backend('auto', torch.zeros(1, device='meta')) == 'reference'
    assert resolve_backend('triton', u) == 'triton'
    monkeypatch.setenv('VIM_SCAN_BACKEND', 'triton')
    assert resolve_backend(None, u) == 'triton'
    assert resolve_backend('reference', u) == 'reference'


def test_backend_argument_and_environment_run_the_triton_op(monkeypatch):
    args = _args()
    expected = bidirectional_scan_triton(*args)
    torch.testing.assert_close(bidirectional_scan(*args, backend='triton'), expected, rtol=0, atol=0)
    monkeypatch.setenv('VIM_SCAN_BACKEND', 'triton')
    torch.testing.assert_close(bidirectional_scan(*args), expected, rtol=0, atol=0)


def test_triton_has_no_single_direction_scan():
    u = torch.zeros(1, 4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="'triton' has no selective_scan"):
        selective_scan(u, u, torch.zeros(4, 2, device=DEVICE), torch.zeros(1, 2, 3, device=DEVICE),
                       torch.zeros(1, 2, 3, device=DEVICE), backend='triton')


def test_conv_dispatches_like_the_scan(monkeypatch):
    x = torch.randn(2, 4, 5, device=DEVICE)
    w, b = torch.randn(2, 4, 3, device=DEVICE), torch.randn(2, 4, device=DEVICE)
    expected = bidirectional_conv_silu_triton(x, w, b)
    torch.testing.assert_close(bidirectional_conv_silu(x, w, b, backend='triton'), expected, rtol=0, atol=0)
    monkeypatch.setenv('VIM_SCAN_BACKEND', 'triton')
    torch.testing.assert_close(bidirectional_conv_silu(x, w, b), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="Unknown scan backend 'cuda'"):
        bidirectional_conv_silu(x, w, b, backend='cuda')


def test_clear_error_without_triton(monkeypatch):
    monkeypatch.setattr(interface, 'TRITON_INSTALLED', False)
    with pytest.raises(RuntimeError, match='needs the triton package'):
        resolve_backend('triton', torch.zeros(1))
    cpu_auto = 'cpu' if cpu_backend_status()[0] and DEVICE == 'cpu' else 'reference'
    assert resolve_backend('auto', torch.zeros(1, device=DEVICE)) == cpu_auto


def test_clear_error_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(triton_op, 'INTERPRET', False)
    with pytest.raises(RuntimeError, match='needs CUDA tensors.*TRITON_INTERPRET=1'):
        resolve_backend('triton', torch.zeros(1))
    with pytest.raises(RuntimeError, match='needs CUDA tensors'):
        bidirectional_scan_triton(*[a.cpu() for a in _args()])


def test_dstate_past_the_triton_tiles(monkeypatch):
    """The Triton scan holds at most MAX_DSTATE states a channel: asked for by name it raises one clear error
    before any launch; 'auto' runs the reference for such inputs instead."""
    from vim.kernels.triton.fwd import MAX_DSTATE
    x = make_inputs(1, 4, 3, MAX_DSTATE + 1, torch.float32, seed=3)
    args = [x[n].detach() for n in NAMES]
    with pytest.raises(ValueError, match=f'd_state <= {MAX_DSTATE}.*got {MAX_DSTATE + 1}'):
        bidirectional_scan(*args, backend='triton')
    monkeypatch.delenv('VIM_SCAN_BACKEND', raising=False)
    # as on a CUDA device, where 'auto' resolves to the self-checked Triton scan
    monkeypatch.setattr(interface, '_auto_backend', lambda t, op='scan': 'triton')
    assert interface._scan_backend(None, args[0], args[2]) == interface.FALLBACK
    assert interface._scan_backend(None, args[0], args[2][..., :MAX_DSTATE]) == 'triton'
    assert interface._scan_backend('triton', args[0], args[2]) == 'triton'  # and the op raises, as above
    torch.testing.assert_close(bidirectional_scan(*args), interface.bidirectional_scan_ref(*args), rtol=0, atol=0)
