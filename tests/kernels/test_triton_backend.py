"""Dispatch to the triton backend: explicit selection only, and clear errors where it cannot run."""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip('triton')

import vim.kernels.triton.op as triton_op  # noqa: E402
from vim.kernels import available_backends, bidirectional_scan, resolve_backend, selective_scan  # noqa: E402
from vim.kernels.triton import bidirectional_scan_triton  # noqa: E402

from tests.kernels.test_triton_interpreter import DEVICE, NAMES, make_inputs  # noqa: E402


def _args():
    x = make_inputs(1, 4, 3, 2, torch.float32, seed=11)
    return [x[n].detach() for n in NAMES]


def test_triton_is_selected_explicitly_never_by_auto(monkeypatch):
    assert 'triton' in available_backends()
    u = torch.zeros(1, 2, 4, 3, device=DEVICE)
    monkeypatch.delenv('VIM_SCAN_BACKEND', raising=False)
    assert resolve_backend(None, u) == 'reference'
    assert resolve_backend('auto', u) == 'reference'
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


def test_clear_error_without_triton(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'triton' else find_spec(name, *a))
    with pytest.raises(RuntimeError, match='needs the triton package'):
        resolve_backend('triton', torch.zeros(1))


def test_clear_error_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(triton_op, 'INTERPRET', False)
    with pytest.raises(RuntimeError, match='needs CUDA tensors.*TRITON_INTERPRET=1'):
        resolve_backend('triton', torch.zeros(1))
    with pytest.raises(RuntimeError, match='needs CUDA tensors'):
        bidirectional_scan_triton(*[a.cpu() for a in _args()])
