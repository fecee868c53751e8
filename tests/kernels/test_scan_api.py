"""selective_scan's API where it claims mamba_ssm's semantics: last state, time-invariant B/C, clear errors."""
import pytest
import torch
import vim.kernels.interface as interface
import vim.kernels.reference as reference
from vim.kernels import selective_scan, selective_scan_ref

from .oracle import selective_scan_oracle


def _inputs(batch=2, dim=6, seqlen=13, dstate=4, groups=1, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    bc = (batch, dstate, seqlen) if groups == 1 else (batch, groups, dstate, seqlen)
    return dict(u=r(batch, dim, seqlen), delta=r(batch, dim, seqlen).abs() * 0.5,
                A=-torch.rand(dim, dstate, generator=g, dtype=dtype) - 0.1, B=r(*bc), C=r(*bc),
                D=r(dim), z=r(batch, dim, seqlen), delta_bias=r(dim) * 0.1)


def _last_state(u, delta, A, B, delta_bias=None, delta_softplus=False):
    """The hidden state after the last token, one token at a time. B: (batch, dim, dstate, seqlen) per channel."""
    delta = delta + delta_bias[:, None] if delta_bias is not None else delta
    delta = torch.nn.functional.softplus(delta) if delta_softplus else delta
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    for t in range(u.shape[2]):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[..., t] * u[:, :, t, None]
    return h


@pytest.mark.parametrize('chunk_elements', [None, 64], ids=['one-chunk', 'many-chunks'])
@pytest.mark.parametrize('groups', [1, 2])
def test_return_last_state(monkeypatch, chunk_elements, groups):
    if chunk_elements:
        monkeypatch.setattr(reference, '_CHUNK_ELEMENTS', chunk_elements)
    x = _inputs(groups=groups)
    out, state = selective_scan(**x, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out, selective_scan_oracle(**x, delta_softplus=True), rtol=1e-12, atol=1e-12)
    B = x['B'] if groups > 1 else x['B'].unsqueeze(1)
    B = B.repeat_interleave(x['u'].shape[1] // B.shape[1], dim=1)
    expected = _last_state(x['u'], x['delta'], x['A'], B, x['delta_bias'], delta_softplus=True)
    assert state.shape == (2, 6, 4) and state.dtype == torch.float64
    torch.testing.assert_close(state, expected, rtol=1e-12, atol=1e-12)


def test_last_state_gradient(monkeypatch):
    """The last state is differentiable, across chunk boundaries (gradcheck in fp64)."""
    monkeypatch.setattr(reference, '_CHUNK_ELEMENTS', 48)  # 2 tokens per chunk
    x = {k: v.requires_grad_() for k, v in _inputs(batch=1, dim=3, seqlen=7, dstate=2).items()}
    names = list(x)

    def state_only(*args):
        return selective_scan_ref(**dict(zip(names, args)), delta_softplus=True, return_last_state=True)[1]

    assert torch.autograd.gradcheck(state_only, tuple(x.values()))


def test_time_invariant_B_C():
    """B or C of shape (dim, dstate) (mamba_ssm's time-invariant form) equals the same values given per token."""
    x = _inputs(seqlen=9)
    batch, dim, L = x['u'].shape
    g = torch.Generator().manual_seed(1)
    B_ti, C_ti = (torch.randn(dim, 4, generator=g, dtype=torch.float64) for _ in range(2))
    per_token = lambda w: w[None, :, :, None].expand(batch, dim, 4, L)  # noqa: E731  one group per channel
    for B, C, B_tv, C_tv in [(B_ti, x['C'], per_token(B_ti), x['C'].unsqueeze(1).expand(-1, dim, -1, -1)),
                             (x['B'], C_ti, x['B'].unsqueeze(1).expand(-1, dim, -1, -1), per_token(C_ti)),
                             (B_ti, C_ti, per_token(B_ti), per_token(C_ti))]:
        out, state = selective_scan(**{**x, 'B': B, 'C': C}, return_last_state=True)
        torch.testing.assert_close(out, selective_scan_oracle(**{**x, 'B': B_tv, 'C': C_tv}), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state, _last_state(x['u'], x['delta'], x['A'], B_tv, x['delta_bias']),
                                   rtol=1e-12, atol=1e-12)


def test_B_C_with_different_group_counts():
    x = _inputs(groups=2)
    C1 = x['C'][:, 0]  # one group
    out = selective_scan(**{**x, 'C': C1})
    expected = selective_scan_oracle(**{**x, 'B': x['B'].repeat_interleave(3, dim=1),
                                        'C': C1.unsqueeze(1).expand(-1, 6, -1, -1)})
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('field,value,match', [
    ('A', lambda x: x['A'].to(torch.complex128), 'complex'),
    ('B', lambda x: x['B'].to(torch.complex128), 'complex'),
    ('B', lambda x: torch.cat([x['B'], x['B']], dim=-1), 'B must be'),  # longer than u: mamba_ssm raises too
    ('C', lambda x: x['C'][..., :-1], 'C must be'),
    ('B', lambda x: x['B'][:1], 'B must be'),  # batch
    ('B', lambda x: x['B'][:, :3], 'B must be'),  # dstate
    ('C', lambda x: torch.randn(2, 4, 4, 13, dtype=torch.float64), 'C must be'),  # 4 groups do not divide dim 6
    ('B', lambda x: torch.randn(6, 3, dtype=torch.float64), 'B must be'),  # time-invariant, wrong dstate
    ('delta', lambda x: x['delta'][..., :-1], 'delta must have the shape of u'),
    ('z', lambda x: x['z'][..., 1:], 'z must have the shape of u'),
    ('D', lambda x: x['D'][:-1], 'D must be'),
    ('delta_bias', lambda x: x['delta_bias'][None], 'delta_bias must be'),
    ('A', lambda x: x['A'][:-1], 'A must be'),
    ('u', lambda x: x['u'][0], 'u must be'),
])
def test_clear_errors(field, value, match):
    x = _inputs()
    x[field] = value(x)
    error = NotImplementedError if match == 'complex' else ValueError
    with pytest.raises(error, match=match):
        selective_scan(**x)


def test_backend_without_last_state_refuses(monkeypatch):
    """A backend that cannot return the last state says so instead of answering without it."""
    monkeypatch.setitem(interface._SELECTIVE, 'no_state', lambda *args: args[0])
    x = _inputs()
    assert selective_scan(**x, backend='no_state') is x['u']
    with pytest.raises(NotImplementedError, match="'no_state' cannot return the last state"):
        selective_scan(**x, backend='no_state', return_last_state=True)
