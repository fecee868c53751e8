"""``scan_recompute`` (``VisionMamba.set_scan_recompute``, ``--scan-recompute``): each mixer keeps only in_proj's
output for the backward and runs its conv, projections and scan again there. The same gradients bit for bit, on
every backend this machine runs (the Triton one under its interpreter: tests/conftest.py), and what autograd holds
between forward and backward shrinks by the tensors named below."""
from __future__ import annotations

import importlib.util

import pytest
import timm
import torch
from vim.kernels.cpu import cpu_backend_status

import vim  # noqa: F401  (registers the models)

BACKENDS = ['reference',
            pytest.param('cpu', marks=pytest.mark.skipif(not cpu_backend_status()[0], reason='no CPU kernels here')),
            pytest.param('triton', marks=pytest.mark.skipif(importlib.util.find_spec('triton') is None,
                                                            reason='triton not installed'))]


def _held_bytes_and_grads(model, x, amp: bool = False):
    """Bytes of the distinct storages autograd holds for the backward (counted once each, as memory is), the
    output and every parameter's gradient; ``amp``: under bf16 autocast."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    out.square().sum().backward()
    return sum(storages.values()), out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize('amp', [False, True], ids=['fp32', 'bf16-autocast'])  # the recompute runs under autocast too
@pytest.mark.parametrize('backend', BACKENDS)
def test_same_gradients_and_less_held(backend, amp, monkeypatch):
    monkeypatch.setenv('VIM_SCAN_BACKEND', backend)
    # the interpreter runs a Triton tile in ~0.1 ms an element: a narrow model there; with CUDA, the GPU
    size = dict(img_size=16, embed_dim=8, depth=2, d_state=2) if backend == 'triton' else dict(img_size=32)
    device = 'cuda' if backend == 'triton' and torch.cuda.is_available() else 'cpu'
    torch.manual_seed(0)
    model = timm.create_model('test_vim', num_classes=3, drop_path_rate=0.0, **size).to(device)
    x = torch.randn(2, 3, size['img_size'], size['img_size'], device=device)
    held, out, grads = _held_bytes_and_grads(model, x, amp)
    model.set_scan_recompute(True)
    assert all(block.mixer.scan_recompute for block in model.layers)
    held_recompute, out_recompute, grads_recompute = _held_bytes_and_grads(model, x, amp)
    assert torch.equal(out, out_recompute)
    for name, g in grads.items():
        assert torch.equal(g, grads_recompute[name]), name  # the same ops on the same values: bit for bit
    # not held any more, per layer: at least u (both branches' conv output) and the step sizes delta, each
    # 2 d_inner values a token (2 bytes an element under bf16 autocast, 4 without), besides what the scan saves of
    # its own (chunk states, its ysum)
    mixer = model.layers[0].mixer
    tokens = model.patch_embed.num_patches + 1
    u_bytes = 2 * x.shape[0] * 2 * mixer.d_inner * tokens * (2 if amp else 4)
    assert held - held_recompute >= len(model.layers) * u_bytes, (held, held_recompute)


def test_inference_and_torch_compile(monkeypatch):
    """No checkpoint without autograd (nothing to hold); torch.compile traces the checkpointed region (one graph)
    and its gradients equal eager's."""
    monkeypatch.setenv('VIM_SCAN_BACKEND', 'reference')
    torch.manual_seed(0)
    model = timm.create_model('test_vim', num_classes=3, scan_recompute=True)
    x = torch.randn(2, 3, 64, 64)
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr('vim.layers.mixer.checkpoint', lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        model(x)
    assert calls == []
    model(x).sum().backward()
    assert len(calls) == len(model.layers)
    monkeypatch.setattr('vim.layers.mixer.checkpoint', real)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.compiler.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch.compile(model, backend='aot_eager')(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_block_checkpointing_covers_it(monkeypatch):
    """With timm's set_grad_checkpointing the whole block runs again in the backward; the mixers' own recompute
    would add a third forward scan a layer, so it pauses while block checkpointing is on and comes back after."""
    import vim.layers.mixer as mixer_module
    monkeypatch.setenv('VIM_SCAN_BACKEND', 'reference')
    scans = []
    real = mixer_module.bidirectional_scan
    monkeypatch.setattr(mixer_module, 'bidirectional_scan', lambda *a, **k: scans.append(1) or real(*a, **k))
    model = timm.create_model('test_vim', num_classes=3, scan_recompute=True)
    x = torch.randn(1, 3, 64, 64)

    def scans_per_layer_in_a_step():
        scans.clear()
        model(x).sum().backward()
        return len(scans) / len(model.layers)
    assert scans_per_layer_in_a_step() == 2  # the forward, and the mixer's recompute
    model.set_grad_checkpointing(True)
    assert not any(b.mixer.scan_recompute for b in model.layers)
    assert scans_per_layer_in_a_step() == 2  # the forward, and the block's recompute
    model.set_grad_checkpointing(False)
    assert all(b.mixer.scan_recompute for b in model.layers)
    model.set_scan_recompute(False)
    assert scans_per_layer_in_a_step() == 1


def test_held_activations_benchmark_runs():
    """benchmarks/held_activations.py (the README's held-activation figures): it runs, and its figures say less is
    held with the knob."""
    import re
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[2] / 'benchmarks' / 'held_activations.py'
    run = subprocess.run([sys.executable, str(script), '--models', 'test_vim', 'test_vit', '--img-size', '32',
                          '--backends', 'reference', '--batch-size', '1'], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    vim_row = re.search(r'test_vim +([\d.]+), with scan_recompute +([\d.]+) \(reference backend\)', run.stdout)
    assert vim_row and float(vim_row[2]) < float(vim_row[1]), run.stdout
    assert re.search(r'test_vit +[\d.]+\n', run.stdout), run.stdout
