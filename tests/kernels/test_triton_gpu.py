"""GPU checks of the Triton kernels (skipped without CUDA; tests/conftest.py).

- 240 random cases of the bidirectional scan over shapes, lengths (1 to 4097), dtypes, input layouts and chunk sizes:
  output and all eight gradients against ``bidirectional_scan_ref`` in float64, tolerances by dtype;
- 60 random cases of the two-branch conv + silu: output and the gradients of x, weight and bias against
  ``bidirectional_conv_silu_ref`` in float64;
- every autotune config of every kernel on its own, so that autotuning can never pick a config that computes wrongly;
- determinism, and no recompilation for a new sequence length (do_not_specialize);
- whole Vim-Ti and Vim-S (timm): logits and every parameter gradient, triton vs reference.
"""
from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip('triton')

import timm  # noqa: E402
import triton  # noqa: E402
from vim.kernels.triton import AUTOTUNED_KERNELS, bidirectional_scan_triton, bwd, conv, fwd  # noqa: E402

import vim  # noqa: E402,F401  (registers the models)
from tests.kernels.test_triton_conv_interpreter import check_conv_against_reference, make_conv_inputs  # noqa: E402
from tests.kernels.test_triton_interpreter import (  # noqa: E402,F401  (nan_filled_empty: autouse fixture)
    NAMES,
    check_against_reference,
    make_inputs,
    nan_filled_empty,
)

pytestmark = pytest.mark.gpu
KERNELS = (fwd._segment_state_kernel, fwd._segment_boundary_kernel, fwd._scan_output_kernel,
           bwd._segment_carry_kernel, bwd._bidirectional_scan_bwd_kernel)
CONV_KERNELS = (conv._bidirectional_conv_fwd_kernel, conv._bidirectional_conv_bwd_kernel)
SEQLENS = [1, 2, 3, 31, 32, 33, 64, 97, 197, 256, 730, 1025, 4097]


def _random_case(seed: int) -> dict:
    """Shape, dtype and layout of case ``seed``. Dims, states and layouts are drawn from short lists: each new
    (dim, dstate, dtypes) triggers autotuning and each new specialisation a compile."""
    rng = random.Random(seed)
    case = dict(batch=rng.choice([1, 2, 3]), dim=rng.choice([5, 48, 384]), dstate=rng.choice([1, 5, 16, 16]),
                seqlen=rng.choice(SEQLENS), dtype=rng.choice([torch.float32, torch.bfloat16, torch.float16]),
                layout=rng.choice(['contiguous', 'contiguous', 'mixer', 'strided']),
                decay=rng.choice([1.0, 1.0, 10.0]), chunk_size=None, delta_softplus=True)
    if case['dtype'] == torch.float32 and case['layout'] == 'contiguous':
        case['chunk_size'] = rng.choice([None, 2, 4])  # None: op.DEFAULT_CHUNK (8), the largest
        case['delta_softplus'] = rng.random() < 0.8
    if case['seqlen'] > 1000:  # keep the float64 reference affordable
        case['batch'], case['dim'] = 1, min(case['dim'], 48)
    return case


def _case_id(seed: int) -> str:
    c = _random_case(seed)
    return (f"{seed}-b{c['batch']}d{c['dim']}N{c['dstate']}L{c['seqlen']}-{str(c['dtype'])[6:]}-{c['layout']}"
            f"-c{c['chunk_size']}{'' if c['delta_softplus'] else '-nosoftplus'}")


@pytest.mark.parametrize('seed', range(240), ids=_case_id)
def test_random_cases_match_reference(seed):
    c = _random_case(seed)
    x = make_inputs(c['batch'], c['dim'], c['seqlen'], c['dstate'], c['dtype'], layout=c['layout'], seed=seed,
                    decay=c['decay'], positive_delta=not c['delta_softplus'], device='cuda')
    check_against_reference(x, chunk_size=c['chunk_size'], delta_softplus=c['delta_softplus'], seed=seed)


def _random_conv_case(seed: int) -> tuple:
    rng = random.Random(seed)
    return (rng.choice([1, 2, 5]), rng.choice([3, 40, 384, 1536]), rng.choice(SEQLENS), rng.choice([4, 4, 4, 2, 3]),
            rng.choice([torch.float32, torch.bfloat16, torch.float16]), rng.choice(['contiguous', 'mixer', 'strided']))


@pytest.mark.parametrize('seed', range(60), ids=lambda s: '{}-b{}d{}L{}w{}-{}-{}'.format(s, *_random_conv_case(s)))
def test_random_conv_cases_match_reference(seed):
    batch, dim, seqlen, width, dtype, layout = _random_conv_case(seed)
    if seqlen > 1000:
        batch = 1
    check_conv_against_reference(*make_conv_inputs(batch, dim, seqlen, width, dtype, layout, seed, 'cuda'), seed)


@pytest.mark.parametrize('which', ['fwd', 'bwd'])
def test_every_conv_autotune_config_is_correct(which, monkeypatch):
    kernel = CONV_KERNELS[0] if which == 'fwd' else CONV_KERNELS[1]
    for config in list(kernel.configs):
        monkeypatch.setattr(kernel, 'configs', [config])
        for args in [(2, 384, 197, 4, torch.bfloat16, 'mixer'), (1, 40, 130, 4, torch.float32, 'contiguous')]:
            check_conv_against_reference(*make_conv_inputs(*args, seed=args[2], device='cuda'), seed=args[2])


@pytest.mark.parametrize('kernel', KERNELS, ids=lambda k: k.fn.__name__)
def test_every_autotune_config_is_correct(kernel, monkeypatch):
    assert set(KERNELS) | set(CONV_KERNELS) == set(AUTOTUNED_KERNELS)
    for config in list(kernel.configs):
        monkeypatch.setattr(kernel, 'configs', [config])  # one config: the autotuner runs it without benchmarking
        # (2, 384, 197) and (1, 384, 1100): the split forward and backward (side passes, boundaries, main
        # passes), several segments each; (1, 40, 33) one segment
        for args in [(2, 384, 197, 16, torch.bfloat16, 'mixer'), (1, 40, 33, 5, torch.float32, 'contiguous'),
                     (1, 384, 1100, 16, torch.bfloat16, 'mixer')]:
            x = make_inputs(*args[:5], layout=args[5], seed=args[2], device='cuda')
            check_against_reference(x, seed=args[2])


def test_offsets_past_2_31_elements():
    """dim * seqlen > 2**31 (int32 offsets would wrap): the last channels of a (1, 2, 2**15 + 64, 2**16 + 3) scan
    equal the same channels scanned alone (channels are independent). About 45 GB of GPU memory."""
    dim, seqlen, dstate = 2**15 + 64, 2**16 + 3, 2
    assert dim * seqlen > 2**31
    g = torch.Generator(device='cuda').manual_seed(0)
    r = lambda *s: torch.randn(*s, device='cuda', generator=g, dtype=torch.bfloat16)  # noqa: E731
    u, delta, z = r(1, 2, dim, seqlen), r(1, 2, dim, seqlen) * 0.5, r(1, dim, seqlen)
    B, C = r(1, 2, dstate, seqlen), r(1, 2, dstate, seqlen)
    A = -torch.rand(2, dim, dstate, device='cuda', generator=g) - 0.1
    D, bias = torch.randn(2, dim, device='cuda', generator=g), torch.randn(2, dim, device='cuda', generator=g)
    with torch.no_grad():
        y = bidirectional_scan_triton(u, delta, A, B, C, D, z, bias)
        last = slice(dim - 64, dim)
        y_last = bidirectional_scan_triton(u[:, :, last].contiguous(), delta[:, :, last].contiguous(), A[:, last],
                                           B, C, D[:, last], z[:, last].contiguous(), bias[:, last])
    # the split (and so rounding) depends on dim: bf16 tolerance; wrapped offsets would read other channels
    torch.testing.assert_close(y[:, last].float(), y_last.float(), rtol=2e-2, atol=2e-2)


def test_deterministic():
    x = make_inputs(2, 384, 197, 16, torch.bfloat16, layout='mixer', seed=1, device='cuda')
    args = [x[n] for n in NAMES]
    gout = torch.randn(2, 384, 197, device='cuda', dtype=torch.bfloat16)
    runs = []
    for _ in range(3):
        y = bidirectional_scan_triton(*args)
        runs.append((y, torch.autograd.grad(y, args, gout)))
    for y, grads in runs[1:]:
        torch.testing.assert_close(y, runs[0][0], rtol=0, atol=0)
        # B and C gradients are summed over dim blocks with atomics: only their last bits may differ
        for name, g, g0 in zip(NAMES, grads, runs[0][1]):
            exact = name not in ('B', 'C')
            torch.testing.assert_close(g, g0, rtol=0 if exact else 1e-2, atol=0 if exact else 1e-2, msg=name)


def test_new_sequence_length_does_not_recompile(monkeypatch):
    compiles = []

    def count(**kwargs):
        compiles.append(kwargs.get('repr'))
        return False  # True would skip the compilation

    for kernel in AUTOTUNED_KERNELS:
        monkeypatch.setattr(kernel, 'configs', kernel.configs[:1])
    for seqlen in (197, 199, 211):  # same divisibility of every stride by 16: only seqlen itself changes
        if seqlen == 199:
            monkeypatch.setattr(triton.knobs.runtime, 'jit_cache_hook', count)
        x = make_inputs(2, 384, seqlen, 16, torch.bfloat16, seed=seqlen, device='cuda')
        y = bidirectional_scan_triton(*[x[n] for n in NAMES])
        y.float().sum().backward()
    torch.cuda.synchronize()
    assert compiles == [], compiles


@pytest.mark.parametrize('name', ['vim_tiny_patch16_224', 'vim_small_patch16_224'])
@pytest.mark.parametrize('amp', [False, True], ids=['fp32', 'bf16-autocast'])
def test_vim_matches_reference_backend(name, amp, monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model(name).cuda().eval()  # eval: no dropout; gradients still flow
    x = torch.randn(2, 3, 224, 224, device='cuda')
    w = torch.randn(2, model.num_classes, device='cuda')

    def run(backend):
        monkeypatch.setenv('VIM_SCAN_BACKEND', backend)
        model.zero_grad(set_to_none=True)
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        (logits.float() * w).sum().backward()
        return logits.detach().float(), {n: p.grad.detach().float() for n, p in model.named_parameters()}

    logits_ref, grads_ref = run('reference')
    logits, grads = run('triton')
    # bf16: the reference rounds each direction's output to bf16 before averaging, the fused op rounds once
    tol = 3e-2 if amp else 1e-4
    assert (logits - logits_ref).norm() <= tol * logits_ref.norm()
    floor = 1e-3 * max(g.norm() for g in grads_ref.values())  # parameters whose gradient nearly vanishes
    for name, g_ref in grads_ref.items():
        err = (grads[name] - g_ref).norm()
        assert err <= 10 * tol * (g_ref.norm() + floor), f'{name}: gradient error {err:.2e}, norm {g_ref.norm():.2e}'


@pytest.mark.parametrize('recompute, grad', [(False, False), (False, True), (True, True)])
def test_eager_calls_match_the_custom_ops_on_cuda(recompute, grad, monkeypatch):
    """Plain eager calls past the custom ops (vim.kernels.eager) give the ops' bits on the GPU too."""
    from tests.kernels.test_triton_eager import check_eager_matches_ops
    check_eager_matches_ops(recompute, grad, monkeypatch)


def test_recompute_states_on_cuda():
    from tests.kernels.test_triton_recompute import check_recompute
    check_recompute(torch.bfloat16, 'mixer')


@pytest.mark.parametrize('mode', [None, 'reduce-overhead'], ids=['inductor', 'inductor-cudagraphs'])
def test_torch_compile_matches_eager_on_cuda(mode, monkeypatch):
    """What ``--torchcompile [--torchcompile-mode reduce-overhead]`` runs: Vim-Ti under Inductor (and its CUDA graph
    trees) in bf16 autocast, logits and every parameter gradient against the same model in eager mode."""
    monkeypatch.setenv('VIM_SCAN_BACKEND', 'triton')
    torch.manual_seed(0)
    model = timm.create_model('vim_tiny_patch16_224').cuda().eval()
    x = torch.randn(2, 3, 224, 224, device='cuda')
    w = torch.randn(2, model.num_classes, device='cuda')

    def run(forward):
        model.zero_grad(set_to_none=True)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            logits = forward(x)
        (logits.float() * w).sum().backward()
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}
        return logits.detach().float().clone(), grads

    logits_ref, grads_ref = run(model)
    torch.compiler.reset()
    compiled = torch.compile(model, mode=mode)
    for _ in range(3):  # the CUDA graph trees record on the second call and replay from the third
        logits, grads = run(compiled)
    tol = 3e-2  # bf16: Inductor fuses the elementwise ops around the scan and rounds in other places
    assert (logits - logits_ref).norm() <= tol * logits_ref.norm()
    floor = 1e-3 * max(g.norm() for g in grads_ref.values())
    for name, g_ref in grads_ref.items():
        err = (grads[name] - g_ref).norm()
        assert err <= 10 * tol * (g_ref.norm() + floor), f'{name}: gradient error {err:.2e}, norm {g_ref.norm():.2e}'


def test_compiled_model_under_auto_runs_the_kernels(monkeypatch, recwarn):
    """``maybe_compile`` (every tool's --torchcompile) on a process whose 'auto' has not yet checked the device: the
    self-check runs before tracing, so the compiled model gets the Triton ops, not the reference with a warning."""
    from vim.kernels import interface

    from vim.utils import maybe_compile
    monkeypatch.delenv('VIM_SCAN_BACKEND', raising=False)
    monkeypatch.setattr(interface, '_AUTO_CHOICE', {})  # as in a fresh process
    monkeypatch.setattr(interface, '_WARNED', set())
    model = timm.create_model('test_vim').cuda().eval()
    compiled = maybe_compile(model, 'inductor', device='cuda', dtype=torch.bfloat16)
    torch.compiler.reset()
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        compiled(torch.randn(2, 3, 64, 64, device='cuda'))
    assert not [w for w in recwarn if issubclass(w.category, interface.ScanBackendWarning)], \
        [str(w.message) for w in recwarn]
    index = torch.cuda.current_device()
    assert interface._AUTO_CHOICE[('cuda', index, torch.bfloat16, 'scan')] == 'triton'
