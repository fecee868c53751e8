"""The scan op's decomposition for exporters (vim.kernels.export) computes what the op computes."""
import pytest
import torch
from vim.kernels import export_decompositions
from vim.kernels.export import selective_scan_fwd_decomposed


@pytest.mark.parametrize('L,T,groups', [(1, 1, 1), (7, 3, 1), (9, 4, 2), (8, 8, 2)])
def test_decomposition_matches_the_op(L, T, groups):
    g = torch.Generator().manual_seed(L)
    b, dim, N = 2, 6, 3
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    u, delta = r(L, b, dim), r(L, b, dim).abs() * 0.5
    A = -torch.rand(dim, N, generator=g, dtype=torch.float64) - 0.1
    B, C = r(L, b, groups, N), r(L, b, groups, N)
    y, states = torch.ops.vim.selective_scan_fwd(u, delta, A, B, C, T)
    y_dec, states_dec = selective_scan_fwd_decomposed(u, delta, A, B, C, T)
    assert states.shape == states_dec.shape == (-(-L // T), b, dim, N)  # after each chunk, the last one final
    torch.testing.assert_close(y_dec, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(states_dec, states, rtol=1e-12, atol=1e-12)


def test_decomposition_table_rewrites_the_exported_scan():
    import timm

    import vim  # noqa: F401
    model = timm.create_model('test_vim', num_classes=3, depth=1).eval().requires_grad_(False)
    x = torch.randn(2, 3, 64, 64)
    exported = torch.export.export(model, (x,)).run_decompositions(export_decompositions())
    targets = {n.target for n in exported.graph.nodes}
    assert torch.ops.vim.selective_scan_fwd.default not in targets
    assert torch.ops.higher_order.scan in targets
    torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-6)
