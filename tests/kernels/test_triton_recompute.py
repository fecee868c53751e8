"""``recompute_states``: the Triton scan's backward writes the chunk states again instead of the forward saving them
(the Triton interpreter on CPU; tests/conftest.py)."""
from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip('triton')

from vim.kernels import bidirectional_scan  # noqa: E402
from vim.kernels.triton import bidirectional_scan_triton  # noqa: E402

from tests.kernels.test_triton_eager import PassthroughMode  # noqa: E402
from tests.kernels.test_triton_interpreter import DEVICE, NAMES, make_inputs  # noqa: E402


def _saved_shapes(fn, *args, **kwargs) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """``fn(*args, **kwargs)`` and the shapes of the tensors autograd saves while it runs."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return out, shapes


@pytest.mark.parametrize('dtype, layout, via', [(torch.float32, 'contiguous', 'eager'),
                                                (torch.bfloat16, 'mixer', 'eager'),
                                                (torch.bfloat16, 'mixer', 'custom op')])
def test_recomputed_states_give_the_same_gradients_and_are_not_saved(dtype, layout, via):
    """Both paths: plain eager calls (vim.kernels.eager) and the custom ops (taken under a dispatch mode)."""
    mode = PassthroughMode() if via == 'custom op' else contextlib.nullcontext()
    with mode:
        check_recompute(dtype, layout)


def check_recompute(dtype: torch.dtype, layout: str) -> None:
    """Recomputed and saved states give the same output and gradients, and only the saved ones are saved (on CUDA
    too: tests/kernels/test_triton_gpu.py)."""
    batch, dim, seqlen, dstate, chunk = 2, 5, 19, 4, 4
    x = make_inputs(batch, dim, seqlen, dstate, dtype, layout=layout)
    states = (batch, 2, -(-seqlen // chunk) - 1, dim, dstate)
    gout = torch.randn(batch, dim, seqlen, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    results = {}
    for recompute in (False, True):
        out, saved = _saved_shapes(bidirectional_scan_triton, *(x[n] for n in NAMES), chunk_size=chunk,
                                   recompute_states=recompute)
        grads = torch.autograd.grad(out, [x[n] for n in NAMES], gout)
        results[recompute] = out, grads
        assert (states in saved) != recompute, saved  # saved by the forward, or not at all
        ysum = (batch, dim, seqlen)
        assert saved.count(ysum) == (1 if recompute else 2), saved  # z only, or z and ysum
    (out0, grads0), (out1, grads1) = results[False], results[True]
    assert torch.equal(out0, out1)
    for name, g0, g1 in zip(NAMES, grads0, grads1):
        assert g0.dtype == g1.dtype and g0.stride() == g1.stride(), name
        assert torch.equal(g0, g1), name  # the same kernels on the same states: bit for bit


def test_the_interface_passes_it_to_triton_only(monkeypatch):
    """``bidirectional_scan(..., recompute_states=True)`` reaches the Triton op; the reference ignores it."""
    x = make_inputs(1, 3, 9, 2, torch.float32)
    args = [x[n] for n in NAMES]
    _, saved = _saved_shapes(bidirectional_scan, *args, backend='triton', recompute_states=True)
    assert (1, 2, -(-9 // 8) - 1, 3, 2) not in saved
    ref = bidirectional_scan(*args, backend='reference', recompute_states=True)
    torch.testing.assert_close(ref, bidirectional_scan(*args, backend='reference'), rtol=0, atol=0)


def test_recompute_traces_under_torch_compile():
    """The recomputing backward is a custom op with a fake implementation: aot_eager traces forward and backward."""
    x = make_inputs(1, 3, 9, 2, torch.float32)
    args = [x[n] for n in NAMES]

    def loss(*a):
        return bidirectional_scan_triton(*a, chunk_size=4, recompute_states=True).square().sum()
    compiled = torch.compile(loss, backend='aot_eager', fullgraph=True)
    grads = torch.autograd.grad(compiled(*args), args)
    expected = torch.autograd.grad(loss(*args), args)
    for name, g, e in zip(NAMES, grads, expected):
        assert torch.equal(g, e), name
