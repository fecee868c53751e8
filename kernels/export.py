"""The reference scan op written with torch's ``scan`` higher-order op, for exporters that cannot keep an opaque
custom op (ONNX): ``exported.run_decompositions(export_decompositions())`` replaces every ``vim::selective_scan_fwd``
node by a loop over tokens that torch.onnx translates into an ONNX ``Scan``.

The decomposition is for inference graphs: it computes the same outputs as the op (the per-token outputs and the
state after each chunk, the last one the final state), one token per step, with no chunking.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch._higher_order_ops.scan import scan

__all__ = ['export_decompositions', 'selective_scan_fwd_decomposed']


def selective_scan_fwd_decomposed(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                                  C: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``vim::selective_scan_fwd`` in traceable ops. Time-major, as the op: u, delta (L, b, dim); A (dim, N);
    B, C (L, b, G, N) -> y (L, b, dim), states (ceil(L / T), b, dim, N), the state after every T-th token and after
    the last."""
    L, dim = u.shape[0], u.shape[2]
    G = B.shape[2]
    # B and C per channel before the loop: the step function then closes over no Python number, which torch would
    # turn into a symbolic input of the loop body once another shape had been traced (and ONNX cannot take those)
    B, C = (x.unsqueeze(3).expand(-1, -1, -1, dim // G, -1).flatten(2, 3) for x in (B, C))  # (L, b, dim, N)
    n_inner = -(-L // T) - 1  # states after every T-th token, before the last

    def step(h: torch.Tensor, xs: tuple[torch.Tensor, ...]):
        u_t, dt_t, B_t, C_t = xs
        h = torch.exp(dt_t.unsqueeze(-1) * A) * h + (dt_t * u_t).unsqueeze(-1) * B_t
        y_t = (h * C_t).sum(-1)
        return h, ((y_t, h.clone()) if n_inner else (y_t,))

    h0 = torch.zeros_like(B[0])  # (b, dim, N)
    h_last, outputs = scan(step, h0, (u, delta, B, C))
    if not n_inner:
        return outputs[0], h_last.unsqueeze(0)
    y, hs = outputs
    return y, torch.cat([hs[T - 1:n_inner * T:T], h_last.unsqueeze(0)])


def export_decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """Decomposition table for ``ExportedProgram.run_decompositions``: the scan op as a traceable loop."""
    return {torch.ops.vim.selective_scan_fwd.default: selective_scan_fwd_decomposed}
