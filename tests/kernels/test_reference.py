"""The PyTorch reference scan against the sequential float64 oracle: outputs and every gradient."""
import pytest
import torch
import vim.kernels.reference as reference
from vim.kernels import (
    bidirectional_conv_silu,
    bidirectional_scan,
    bidirectional_scan_ref,
    selective_scan,
    selective_scan_ref,
)

from tests.kernels.oracle import bidirectional_scan_oracle, selective_scan_oracle

# fp32 accumulates in fp32: errors grow with the number of terms, so the bound is a multiple of fp32's epsilon
FP32_TOL = dict(rtol=2e-4, atol=2e-4)
FP64_TOL = dict(rtol=1e-9, atol=1e-9)


def _inputs(batch, dim, seqlen, dstate, groups, dtype, decay=1.0):
    g = torch.Generator().manual_seed(1000 * seqlen + dim)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        u=r(batch, dim, seqlen), delta=r(batch, dim, seqlen) * 0.5,
        A=-torch.rand(dim, dstate, generator=g, dtype=dtype) * 4 * decay - 0.1,
        B=r(batch, groups, dstate, seqlen), C=r(batch, groups, dstate, seqlen),
        D=r(dim), z=r(batch, dim, seqlen), delta_bias=r(dim) * 0.5)


CASES = [  # (batch, dim, seqlen, dstate, groups)
    (1, 4, 1, 3, 1),
    (2, 6, 2, 4, 2),
    (2, 8, 7, 16, 1),
    (1, 12, 33, 5, 3),
    (3, 8, 130, 4, 2),
]


@pytest.mark.parametrize('chunk_elements', [1 << 18, 64], ids=['one-chunk', 'many-chunks'])
@pytest.mark.parametrize('case', CASES, ids=[f'b{c[0]}d{c[1]}L{c[2]}N{c[3]}g{c[4]}' for c in CASES])
def test_selective_scan_matches_oracle(case, chunk_elements, monkeypatch):
    monkeypatch.setattr(reference, '_CHUNK_ELEMENTS', chunk_elements)
    x = _inputs(*case, dtype=torch.float32)
    x64 = {k: v.double().requires_grad_() for k, v in x.items()}
    x32 = {k: v.clone().requires_grad_() for k, v in x.items()}
    y = selective_scan_ref(**x32, delta_softplus=True)
    y_ref = selective_scan_oracle(**x64, delta_softplus=True)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    torch.testing.assert_close(y.double(), y_ref, **FP32_TOL)
    grad = torch.randn_like(y_ref)
    (y.double() * grad).sum().backward()
    (y_ref * grad).sum().backward()
    for name in x:
        torch.testing.assert_close(x32[name].grad.double(), x64[name].grad, **FP32_TOL, msg=f'grad of {name}')


@pytest.mark.parametrize('optional', ['none', 'D', 'z', 'bias'])
def test_optional_inputs(optional):
    x = _inputs(2, 4, 9, 3, 1, torch.float64)
    kept = {k: x[k] for k in ('u', 'delta', 'A', 'B', 'C')}
    if optional != 'none':
        key = {'D': 'D', 'z': 'z', 'bias': 'delta_bias'}[optional]
        kept[key] = x[key]
    torch.testing.assert_close(selective_scan_ref(**kept), selective_scan_oracle(**kept), **FP64_TOL)


def test_three_dim_B_C_equal_one_group():
    x = _inputs(2, 4, 11, 3, 1, torch.float64)
    y3 = selective_scan_ref(x['u'], x['delta'], x['A'], x['B'][:, 0], x['C'][:, 0])
    y4 = selective_scan_ref(x['u'], x['delta'], x['A'], x['B'], x['C'])
    torch.testing.assert_close(y3, y4, rtol=0, atol=0)


def test_gradcheck_float64(monkeypatch):
    monkeypatch.setattr(reference, '_CHUNK_ELEMENTS', 24)  # several chunks at this size
    x = _inputs(2, 4, 6, 3, 2, torch.float64)
    names = list(x)
    args = tuple(x[k].requires_grad_() for k in names)

    def f(*a):
        return selective_scan_ref(**dict(zip(names, a)), delta_softplus=True)

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


def test_bidirectional_is_forward_plus_reverse_scan(monkeypatch):
    monkeypatch.setattr(reference, '_CHUNK_ELEMENTS', 96)
    batch, dim, seqlen, dstate = 2, 6, 21, 4
    g = torch.Generator().manual_seed(3)
    u = torch.randn(batch, 2, dim, seqlen, generator=g, dtype=torch.float64)
    delta = torch.randn(batch, 2, dim, seqlen, generator=g, dtype=torch.float64)
    A = -torch.rand(2, dim, dstate, generator=g, dtype=torch.float64) * 3
    B = torch.randn(batch, 2, dstate, seqlen, generator=g, dtype=torch.float64)
    C = torch.randn(batch, 2, dstate, seqlen, generator=g, dtype=torch.float64)
    D = torch.randn(2, dim, generator=g, dtype=torch.float64)
    z = torch.randn(batch, dim, seqlen, generator=g, dtype=torch.float64)
    bias = torch.randn(2, dim, generator=g, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]
    ref_args = [t.clone().requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]
    y = bidirectional_scan_ref(*args)
    y_ref = bidirectional_scan_oracle(*ref_args)
    torch.testing.assert_close(y, y_ref, **FP64_TOL)
    # the backward direction really is scanned last-to-first: reversing its inputs changes the result
    flipped = bidirectional_scan_ref(u, delta, A, B.flip(-1), C, D, z, bias)
    assert not torch.allclose(flipped, y.detach())
    grad = torch.randn_like(y)
    (y * grad).sum().backward()
    (y_ref * grad).sum().backward()
    for a, b in zip(args, ref_args):
        torch.testing.assert_close(a.grad, b.grad, **FP64_TOL)
    assert torch.autograd.gradcheck(lambda *a: bidirectional_scan_ref(*a), tuple(
        t.detach().clone()[..., :5].contiguous().requires_grad_() if t.shape[-1] == seqlen else
        t.detach().clone().requires_grad_() for t in (u, delta, A, B, C, D, z, bias)), eps=1e-6, atol=1e-6)


def test_long_sequence_strong_decay_is_finite_and_exact():
    """A long sequence whose cumulative decay underflows any exp(-cumsum) factorisation many times over."""
    x = _inputs(1, 4, 4096, 4, 1, torch.float32, decay=25.0)
    x['delta_bias'] = x['delta_bias'] + 3.0  # softplus(delta) ~ 3: per-step log-decay down to about -300
    y = selective_scan_ref(**x, delta_softplus=True)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), selective_scan_oracle(**x, delta_softplus=True), **FP32_TOL)


def test_low_precision_inputs_compute_in_fp32():
    x = _inputs(2, 8, 17, 4, 1, torch.float32)
    y32 = selective_scan_ref(**x, delta_softplus=True)
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float16, 2e-3)):
        xl = {k: v.to(dtype) for k, v in x.items()}
        y = selective_scan_ref(**xl, delta_softplus=True)
        assert y.dtype == dtype
        y_oracle = selective_scan_oracle(**{k: v.double() for k, v in xl.items()}, delta_softplus=True)
        # only the final cast to the activation dtype may add error
        torch.testing.assert_close(y.double(), y_oracle, rtol=tol, atol=tol)
    assert torch.isfinite(y32).all()


def test_backend_dispatch(monkeypatch):
    x = _inputs(1, 4, 5, 3, 1, torch.float64)
    torch.testing.assert_close(selective_scan(**x, backend='reference'), selective_scan_ref(**x), rtol=0, atol=0)
    with pytest.raises(ValueError, match='Unknown scan backend'):
        selective_scan(**x, backend='nope')
    monkeypatch.setenv('VIM_SCAN_BACKEND', 'missing')
    with pytest.raises(ValueError, match='VIM_SCAN_BACKEND'):
        selective_scan(**x)
    monkeypatch.setenv('VIM_SCAN_BACKEND', 'reference')
    u = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    args = (u, u, -torch.ones(2, 4, 3, dtype=torch.float64), torch.randn(1, 2, 3, 5, dtype=torch.float64),
            torch.randn(1, 2, 3, 5, dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64), u[:, 0],
            torch.zeros(2, 4, dtype=torch.float64))
    torch.testing.assert_close(bidirectional_scan(*args), bidirectional_scan_ref(*args), rtol=0, atol=0)


def _official_conv_silu(x, weight, bias):
    """The official mixer's two branches: nn.Conv1d(padding=width - 1) cut to the first L outputs (causal) on the
    sequence, and on the flipped sequence with the result flipped back."""
    dim, width = weight.shape[1], weight.shape[2]
    L = x.shape[-1]
    outs = []
    for k, seq in enumerate((x, x.flip(-1))):
        y = torch.nn.functional.conv1d(seq, weight[k].unsqueeze(1), bias[k], padding=width - 1, groups=dim)[..., :L]
        y = torch.nn.functional.silu(y)
        outs.append(y if k == 0 else y.flip(-1))
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize('seqlen,width', [(1, 4), (3, 4), (10, 4), (9, 2), (5, 1)])
def test_bidirectional_conv_silu_matches_official_branches(seqlen, width):
    g = torch.Generator().manual_seed(seqlen)
    x = torch.randn(2, 6, seqlen, generator=g, dtype=torch.float64)
    weight = torch.randn(2, 6, width, generator=g, dtype=torch.float64)
    bias = torch.randn(2, 6, generator=g, dtype=torch.float64)
    expected = _official_conv_silu(x, weight, bias)
    torch.testing.assert_close(reference.bidirectional_conv_silu_ref(x, weight, bias), expected, **FP64_TOL)
    torch.testing.assert_close(bidirectional_conv_silu(x, weight, bias), expected, **FP64_TOL)
    # the mixer's input: a transposed slice of in_proj's output
    xz = torch.randn(2, seqlen, 12, generator=g, dtype=torch.float64)
    x = xz.transpose(1, 2)[:, 6:]
    torch.testing.assert_close(reference.bidirectional_conv_silu_ref(x, weight, bias),
                               _official_conv_silu(x.contiguous(), weight, bias), **FP64_TOL)


def test_bidirectional_conv_silu_rejects_bad_shapes():
    with pytest.raises(ValueError, match='weight'):
        reference.bidirectional_conv_silu_ref(torch.zeros(1, 4, 5), torch.zeros(2, 3, 4), torch.zeros(2, 3))
