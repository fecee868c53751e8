"""The fused CPU kernels (vim.kernels.cpu) against the reference: forward and every gradient of the bidirectional scan
and of the two-branch conv, in float64 and float32, on odd shapes and strided views; thread-count independence; bf16.

The C++ kernels compile once per machine into torch's extension cache; the first test of a fresh machine waits for
that (about half a minute), the others load the cached build.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from vim.kernels import bidirectional_conv_silu_ref, bidirectional_scan_ref
from vim.kernels.cpu import bidirectional_conv_silu_cpu, bidirectional_scan_cpu, cpu_backend_status

# Without a C++ compiler the backend cannot exist (auto falls back, tested in test_cpu_backend_dispatch.py); with
# one, a failed build is a test failure.
pytestmark = pytest.mark.skipif(shutil.which('c++') is None and shutil.which('g++') is None,
                                reason='no C++ compiler')

SCAN_NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')
# Errors relative to each tensor's largest entry. float64: the kernels use accurate exp; fp32: ATen's polynomial exp
# (~1e-6 relative) and fp32 accumulation over the sequence; bf16: one rounding of inputs and results.
TOL = {torch.float64: 1e-10, torch.float32: 2e-4, torch.bfloat16: 2e-2}


@pytest.fixture(scope='module', autouse=True)
def built():
    available, reason = cpu_backend_status()
    assert available, reason


def scan_inputs(batch: int, dim: int, seqlen: int, dstate: int, dtype: torch.dtype, *, layout: str = 'contiguous',
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of bidirectional_scan, leaves (or views of leaves) with requires_grad; A, D, delta_bias in float32 or
    float64 as the mixer passes them.

    layout 'mixer': the views the mixer passes on CPU (u and delta channel-contiguous, z a slice of a transposed
    in_proj output whose token stride is 2 * dim, B and C transposed slices of the token-major x_dbl, state stride 1);
    'strided': every activation a step-2 slice along the tokens (no unit stride anywhere on the token axis)."""
    g = torch.Generator().manual_seed(seed)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32

    def leaf(*shape, scale=1.0, shift=0.0, dt=dtype, rand=False):
        x = torch.rand(*shape, generator=g) if rand else torch.randn(*shape, generator=g)
        return (x * scale + shift).to(dt).requires_grad_()

    A = leaf(2, dim, dstate, scale=-4, shift=-0.1, dt=pdtype, rand=True)
    params = dict(A=A, D=leaf(2, dim, dt=pdtype), delta_bias=leaf(2, dim, scale=0.5, dt=pdtype))
    if layout == 'contiguous':
        acts = dict(u=leaf(batch, 2, dim, seqlen), delta=leaf(batch, 2, dim, seqlen, scale=0.5),
                    B=leaf(batch, 2, dstate, seqlen), C=leaf(batch, 2, dstate, seqlen), z=leaf(batch, dim, seqlen))
    elif layout == 'mixer':
        x_dbl = leaf(batch, 2, seqlen, 3 + 2 * dstate)
        acts = dict(u=leaf(batch, 2, seqlen, dim).transpose(2, 3),
                    delta=leaf(batch, 2, seqlen, dim, scale=0.5).transpose(2, 3),
                    B=x_dbl[..., 3:3 + dstate].transpose(2, 3), C=x_dbl[..., 3 + dstate:].transpose(2, 3),
                    z=leaf(batch, seqlen, 2 * dim).transpose(1, 2)[:, dim:])
    else:
        acts = {k: v[..., ::2] for k, v in scan_inputs(batch, dim, 2 * seqlen, dstate, dtype, seed=seed).items()
                if k in ('u', 'delta', 'B', 'C', 'z')}
    return dict(acts, **params)


def run(fn, x: dict[str, torch.Tensor], gout: torch.Tensor, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """fn's output and the gradient of <out, gout> w.r.t. every named input."""
    out = fn(**x, **kwargs)
    grads = torch.autograd.grad(out, list(x.values()), gout.to(out.dtype))
    return out.detach(), dict(zip(x, grads))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str) -> None:
    assert actual.shape == expected.shape, name
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= tol * max(scale, 1e-6), f'{name}: max error {err:.3g}, max value {scale:.3g}'


def assert_scan_matches_float64_reference(x: dict[str, torch.Tensor], gout: torch.Tensor, tol: float) -> None:
    """The CPU scan (chunk 4) on x against the reference on x in float64: output and every gradient."""
    out, grads = run(bidirectional_scan_cpu, x, gout, chunk_size=4)
    x64 = {k: v.detach().double().requires_grad_() for k, v in x.items()}
    ref, ref_grads = run(bidirectional_scan_ref, x64, gout)
    assert_close(out, ref, tol, 'out')
    for name in SCAN_NAMES:
        assert_close(grads[name], ref_grads[name], tol, name)


SCAN_CASES = [  # batch, dim, seqlen, dstate, chunk
    pytest.param(1, 16, 1, 4, 4, id='len1'),
    pytest.param(2, 5, 7, 3, 4, id='dim5-len7'),
    pytest.param(1, 37, 33, 16, 8, id='dim37-len33-N16'),
    pytest.param(2, 20, 13, 2, 64, id='one-chunk'),
    pytest.param(1, 48, 65, 4, 16, id='len65'),
]


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('batch, dim, seqlen, dstate, chunk', SCAN_CASES)
def test_scan_matches_reference(batch, dim, seqlen, dstate, chunk, dtype):
    x = scan_inputs(batch, dim, seqlen, dstate, dtype)
    gout = torch.randn(batch, dim, seqlen, dtype=torch.float64)
    out, grads = run(bidirectional_scan_cpu, x, gout, chunk_size=chunk)
    x64 = {k: v.detach().double().requires_grad_() for k, v in x.items()}
    ref, ref_grads = run(bidirectional_scan_ref, x64, gout)
    assert out.dtype == dtype
    assert_close(out, ref, TOL[dtype], 'out')
    for name in SCAN_NAMES:
        assert grads[name].dtype == x[name].dtype, name
        assert_close(grads[name], ref_grads[name], TOL[dtype], name)


@pytest.mark.parametrize('layout', ['mixer', 'strided'])
def test_scan_strided_inputs(layout):
    x = scan_inputs(2, 24, 11, 4, torch.float64, layout=layout)
    assert not x['z'].is_contiguous() and not x['B'].is_contiguous()
    gout = torch.randn(2, 24, 11, dtype=torch.float64)
    out, grads = run(bidirectional_scan_cpu, x, gout, chunk_size=4)
    contiguous = {k: v.detach().contiguous().requires_grad_() for k, v in x.items()}
    ref, ref_grads = run(bidirectional_scan_ref, contiguous, gout)
    assert_close(out, ref, TOL[torch.float64], 'out')
    for name in SCAN_NAMES:
        assert_close(grads[name], ref_grads[name], TOL[torch.float64], name)


def test_scan_without_softplus():
    x = scan_inputs(1, 9, 10, 4, torch.float64)
    x['delta'] = x['delta'].detach().abs().requires_grad_()  # positive steps: stable without softplus
    gout = torch.randn(1, 9, 10, dtype=torch.float64)
    out, grads = run(bidirectional_scan_cpu, x, gout, delta_softplus=False, chunk_size=4)
    ref, ref_grads = run(bidirectional_scan_ref, x, gout, delta_softplus=False)
    assert_close(out, ref, TOL[torch.float64], 'out')
    for name in SCAN_NAMES:
        assert_close(grads[name], ref_grads[name], TOL[torch.float64], name)


def test_softplus_is_accurate_in_fp32():
    """The kernels' fp32 softplus within 2e-6 relative of float64 over [-30, 30], the Triton kernels' bar: one token,
    one state, u = B = C = 1 and D = 0, so each channel's ungated mean y (the op's saved ysum) is softplus(delta)."""
    x = torch.cat([torch.linspace(-30, 30, 6001), torch.tensor([-15.0, -12.0, -8.0, 0.0, 1e-6, -1e-6, 20.0, 21.0])])
    dim = x.numel()
    delta = x.view(1, 1, dim, 1).expand(1, 2, dim, 1).contiguous()
    ones = torch.ones(1, 2, 1, 1)
    _, ysum, _ = torch.ops.vim.cpu_bidirectional_scan(
        torch.ones(1, 2, dim, 1), delta, torch.full((2, dim, 1), -1.0), ones, ones, torch.zeros(2, dim),
        torch.zeros(1, dim, 1), torch.zeros(2, dim), True, 4, True)
    exact = torch.log1p(torch.exp(x.double()))
    rel = ((ysum[0, 0].double() - exact).abs() / exact).max().item()
    assert rel <= 2e-6, rel


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_scan_with_some_positive_A(dtype):
    """A block with an entry A > 0 takes the forward's clamped exp2 (A <= 0 everywhere else in these tests)."""
    x = scan_inputs(1, 70, 12, 4, dtype)
    A = x['A'].detach().clone()
    A[0, 3, 1] = A[1, 66, 2] = 0.3  # one block of each direction
    x['A'] = A.requires_grad_()
    assert_scan_matches_float64_reference(x, torch.randn(1, 70, 12, dtype=torch.float64), TOL[dtype])


@pytest.mark.parametrize('layout', ['contiguous', 'mixer'])
def test_scan_with_decays_below_the_exp2_range(layout):
    """fp32: the forward skips exp2's clamps for a token whose decay exponents delta A log2 e all lie in [-124, 0];
    tokens with a large delta in some channels (exponents far below -125: decays that underflow to 0) take the
    clamped exp2, the others the unclamped one, in the same block and direction."""
    x = scan_inputs(1, 70, 17, 16, torch.float32, layout=layout)
    delta = x['delta'].detach().clone()
    delta[0, 0, 5, 3] = delta[0, 1, 66, 9] = delta[0, :, 10:20, 12] = 400.0  # softplus(400 + bias) ~ 400
    x['delta'] = delta.requires_grad_()
    assert (x['A'].detach().abs().amax(-1) * 400 * 1.4427 > 125).all()
    assert_scan_matches_float64_reference(x, torch.randn(1, 70, 17, dtype=torch.float64), TOL[torch.float32])


def test_scan_bf16_inputs():
    x = scan_inputs(2, 20, 9, 4, torch.bfloat16)
    gout = torch.randn(2, 20, 9, dtype=torch.float64)
    out, grads = run(bidirectional_scan_cpu, x, gout, chunk_size=4)
    x64 = {k: v.detach().double().requires_grad_() for k, v in x.items()}
    ref, ref_grads = run(bidirectional_scan_ref, x64, gout.to(torch.bfloat16).double())
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, TOL[torch.bfloat16], 'out')
    for name in SCAN_NAMES:
        assert grads[name].dtype == x[name].dtype, name
        assert_close(grads[name], ref_grads[name], TOL[torch.bfloat16], name)


@pytest.mark.parametrize('context', [torch.no_grad, torch.inference_mode])
def test_calls_without_autograd_match_the_custom_op(context):
    """Without autograd the public functions call the compiled kernels directly (no custom-op dispatch): same bits."""
    x = scan_inputs(2, 70, 19, 5, torch.float32, layout='mixer')  # 70 channels: a full and a partial block
    conv = dict(x=torch.randn(2, 70, 19, requires_grad=True), weight=torch.randn(2, 70, 4, requires_grad=True),
                bias=torch.randn(2, 70, requires_grad=True))
    with_op = bidirectional_scan_cpu(**x), bidirectional_conv_silu_cpu(**conv)
    assert all(t.requires_grad for t in with_op)
    with context():
        direct = bidirectional_scan_cpu(**x), bidirectional_conv_silu_cpu(**conv)
    assert not any(t.requires_grad for t in direct)
    torch.testing.assert_close(direct, tuple(t.detach() for t in with_op), rtol=0, atol=0)
    assert direct[0].stride() == with_op[0].stride() and direct[1].stride() == with_op[1].stride()


def test_profiler_names_the_direct_calls():
    x = scan_inputs(1, 16, 5, 4, torch.float32)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        bidirectional_scan_cpu(**x)
    assert 'vim::cpu_bidirectional_scan' in {e.key for e in prof.key_averages()}


def _with_threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def test_results_do_not_depend_on_the_thread_count():
    x = scan_inputs(3, 40, 21, 4, torch.float32)  # 3 batches x 3 channel blocks: tasks split across threads
    gout = torch.randn(3, 40, 21)
    conv_x = torch.randn(3, 40, 21, requires_grad=True)
    conv_w, conv_b = torch.randn(2, 40, 4, requires_grad=True), torch.randn(2, 40, requires_grad=True)
    gconv = torch.randn(3, 2, 40, 21)

    def both():
        scan = run(bidirectional_scan_cpu, x, gout, chunk_size=8)
        conv = run(bidirectional_conv_silu_cpu, dict(x=conv_x, weight=conv_w, bias=conv_b), gconv)
        return scan, conv

    one, two = _with_threads(1, both), _with_threads(2, both)
    torch.testing.assert_close(one, two, rtol=0, atol=0)


CONV_CASES = [  # batch, dim, seqlen, width
    pytest.param(1, 16, 1, 4, id='len1'),
    pytest.param(2, 5, 3, 4, id='shorter-than-width'),
    pytest.param(2, 37, 19, 4, id='dim37'),
    pytest.param(1, 8, 6, 1, id='width1'),
    pytest.param(1, 20, 9, 3, id='width3'),
]


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('batch, dim, seqlen, width', CONV_CASES)
def test_conv_matches_reference(batch, dim, seqlen, width, dtype):
    # x as the mixer passes it: a slice of in_proj's transposed output
    x = torch.randn(batch, seqlen, 2 * dim, dtype=dtype, requires_grad=True)
    inputs = dict(x=x.transpose(1, 2)[:, :dim], weight=torch.randn(2, dim, width, dtype=dtype, requires_grad=True),
                  bias=torch.randn(2, dim, dtype=dtype, requires_grad=True))
    gout = torch.randn(batch, 2, dim, seqlen, dtype=torch.float64)
    out, grads = run(bidirectional_conv_silu_cpu, inputs, gout)
    ref, ref_grads = run(bidirectional_conv_silu_ref, {k: v.detach().double().requires_grad_()
                                                       for k, v in inputs.items()}, gout)
    assert out.dtype == dtype
    assert_close(out, ref, TOL[dtype], 'out')
    for name in inputs:
        assert grads[name].dtype == dtype
        assert_close(grads[name], ref_grads[name], TOL[dtype], name)


def test_conv_bf16_and_strided_tokens():
    x = torch.randn(2, 12, 22, dtype=torch.bfloat16, requires_grad=True)
    inputs = dict(x=x[..., ::2], weight=torch.randn(2, 12, 4, requires_grad=True), bias=torch.randn(2, 12,
                                                                                                   requires_grad=True))
    gout = torch.randn(2, 2, 12, 11, dtype=torch.float64)
    out, grads = run(bidirectional_conv_silu_cpu, inputs, gout)
    ref, ref_grads = run(bidirectional_conv_silu_ref, {k: v.detach().double().requires_grad_()
                                                       for k, v in inputs.items()}, gout.to(torch.bfloat16).double())
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, TOL[torch.bfloat16], 'out')
    for name in inputs:
        assert_close(grads[name], ref_grads[name], TOL[torch.bfloat16], name)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('layout', ['token-major', 'channel-major'])
@pytest.mark.parametrize('batch, dim, seqlen, rank', [(1, 70, 19, 3), (2, 9, 1, 1), (1, 64, 33, 12)])
def test_low_rank_delta_matches_the_reference(dtype, layout, batch, dim, seqlen, rank):
    """delta_proj_weight: the inference kernel projects the low-rank step per token (dt_proj fused in); with
    autograd the full delta is made first. Both against the reference on the full delta, any dt layout."""
    g = torch.Generator().manual_seed(1)
    x = {k: v.detach() for k, v in scan_inputs(batch, dim, seqlen, 4, dtype, layout='mixer').items()}
    if layout == 'token-major':  # a slice of the mixer's token-major x_dbl
        dt = torch.randn(batch, 2, seqlen, rank + 5, generator=g).to(dtype)[..., 1:rank + 1].transpose(2, 3)
    else:
        dt = torch.randn(batch, 2, rank + 5, seqlen, generator=g).to(dtype)[:, :, 2:rank + 2]
    weight = (torch.randn(2, dim, rank, generator=g) / rank ** 0.5).to(dtype)
    x.pop('delta')
    full = torch.einsum('gdr,bgrl->bgdl', weight.double(), dt.double())
    ref = bidirectional_scan_ref(**{k: v.double() for k, v in x.items()}, delta=full)
    with torch.no_grad():
        fused = bidirectional_scan_cpu(**x, delta=dt, delta_proj_weight=weight)
    assert fused.dtype == dtype
    assert_close(fused, ref, TOL[dtype], 'fused out')
    # the autograd path: full delta first, gradients reach dt and the weight
    leaves = {k: v.clone().requires_grad_() for k, v in dict(x, dt=dt, weight=weight).items()}
    out = bidirectional_scan_cpu(**{k: v for k, v in leaves.items() if k not in ('dt', 'weight')}, delta=leaves['dt'],
                                 delta_proj_weight=leaves['weight'])
    assert_close(out.detach(), ref, TOL[dtype], 'autograd out')
    gout = torch.randn(batch, dim, seqlen, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, [leaves['dt'], leaves['weight']], gout.to(dtype))
    dt64, w64 = dt.double().requires_grad_(), weight.double().requires_grad_()
    ref2 = bidirectional_scan_ref(**{k: v.double() for k, v in x.items()},
                                  delta=torch.einsum('gdr,bgrl->bgdl', w64, dt64))
    ref_grads = torch.autograd.grad(ref2, [dt64, w64], gout)
    for name, a, b in zip(('dt', 'weight'), grads, ref_grads):
        assert_close(a, b, TOL[dtype], name)


def test_low_rank_delta_thread_count_and_bad_shapes():
    g = torch.Generator().manual_seed(2)
    x = {k: v.detach() for k, v in scan_inputs(3, 40, 21, 4, torch.float32).items()}
    x.pop('delta')
    dt, weight = torch.randn(3, 2, 5, 21, generator=g), torch.randn(2, 40, 5, generator=g)
    with torch.no_grad():
        one = _with_threads(1, lambda: bidirectional_scan_cpu(**x, delta=dt, delta_proj_weight=weight))
        two = _with_threads(2, lambda: bidirectional_scan_cpu(**x, delta=dt, delta_proj_weight=weight))
        torch.testing.assert_close(one, two, rtol=0, atol=0)
        with pytest.raises(ValueError, match='low-rank delta'):
            bidirectional_scan_cpu(**x, delta=dt, delta_proj_weight=weight[:, :, :4])
        with pytest.raises(ValueError, match='delta_proj_weight'):
            bidirectional_scan_cpu(**x, delta=dt, delta_proj_weight=weight[:, :39])
