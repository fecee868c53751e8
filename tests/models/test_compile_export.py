"""The mixer's ops are opaque custom ops on both backends: torch.compile sees no graph break, torch.export keeps the
reference scan as a node, and torch.utils.flop_counter counts the scan. The triton backend runs under the Triton
interpreter without CUDA (tests/conftest.py)."""
import importlib.util

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode
from vim.kernels.cpu import cpu_backend_status

import vim  # noqa: F401


@pytest.fixture
def model_and_input():
    return timm.create_model('test_vim', num_classes=5), torch.randn(2, 3, 64, 64)


def _for_backend(model_and_input, backend, monkeypatch):
    """The model and input to run on ``backend``. The Triton interpreter costs ~0.1 ms per element of a scan tile,
    so there the model shrinks to one block of width 8 on 5 tokens (about a second a pass instead of minutes)."""
    monkeypatch.setenv('VIM_SCAN_BACKEND', backend)
    if backend == 'reference':
        return model_and_input
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    model = timm.create_model('test_vim', num_classes=5, img_size=16, embed_dim=8, depth=1, d_state=2)
    return model.to(device), torch.randn(1, 3, 16, 16, device=device)


BACKENDS = ['reference', pytest.param('triton', marks=pytest.mark.skipif(
    importlib.util.find_spec('triton') is None, reason='triton not installed'))]


@pytest.mark.parametrize('backend', BACKENDS)
def test_torch_compile_has_no_graph_break_and_matches_eager(model_and_input, backend, monkeypatch):
    model, x = _for_backend(model_and_input, backend, monkeypatch)
    explanation = torch._dynamo.explain(model.eval())(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, backend='aot_eager')  # traces forward and backward through the custom ops
    model.train()
    compiled(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)


INDUCTOR_BACKENDS = [*BACKENDS, pytest.param('cpu', marks=pytest.mark.skipif(
    not cpu_backend_status()[0], reason='the fused CPU backend does not build here'))]


@pytest.mark.parametrize('backend', INDUCTOR_BACKENDS)
def test_inductor_matches_eager(model_and_input, backend, monkeypatch):
    """torch.compile's default backend (what ``--torchcompile`` gives): Inductor plans its buffers from the ops' fake
    implementations, so a fake output whose strides differ from the real one's would read wrong memory here."""
    model, x = _for_backend(model_and_input, backend, monkeypatch)
    model.train()
    torch.compiler.reset()
    compiled = torch.compile(model)
    out = compiled(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = model(x)
    ref.square().sum().backward()

    def close(actual, expected, what):  # fp32 rounding (2^-24 a step) over the model's fused reductions
        torch.testing.assert_close(actual, expected, rtol=0, atol=2 ** -16 * expected.abs().max().item(), msg=what)
    close(out, ref, 'logits')
    for n, p in model.named_parameters():
        close(grads[n], p.grad, n)


def test_torch_export_keeps_the_scan_op(model_and_input, monkeypatch):
    model, x = model_and_input
    monkeypatch.setenv('VIM_SCAN_BACKEND', 'reference')  # the eager run to compare with: auto runs 'cpu' on CPU
    model.eval()
    exported = torch.export.export(model, (x,))
    scan_nodes = [n for n in exported.graph.nodes if n.target == torch.ops.vim.selective_scan_fwd.default]
    assert len(scan_nodes) == len(model.layers)  # both directions of a layer run as one scan
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize('backend', BACKENDS)
def test_flop_counter_sees_the_scan(model_and_input, backend, monkeypatch):
    model, x = _for_backend(model_and_input, backend, monkeypatch)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    counts = counter.get_flop_counts()['Global']
    mixer = model.layers[0].mixer
    tokens = model.patch_embed.num_patches + 1
    # 9 per (token, channel, state) for each of the two directions of every layer
    expected = 9 * x.shape[0] * tokens * 2 * mixer.d_inner * mixer.d_state * len(model.layers)
    op = torch.ops.vim.selective_scan_fwd if backend == 'reference' else torch.ops.vim.triton_bidirectional_scan
    assert counts[op] == expected
