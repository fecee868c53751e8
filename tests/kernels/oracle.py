"""The sequential float64 selective scan: one token at a time, no chunking, no tricks. Tests only."""

import torch
import torch.nn.functional as F


def selective_scan_oracle(
        u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: torch.Tensor | None = None, z: torch.Tensor | None = None,
        delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
        reverse: bool = False,
) -> torch.Tensor:
    """Same arguments and shapes as ``selective_scan_ref``; ``reverse`` scans from the last token to the first."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    batch, dim, seqlen = u.shape
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    group = dim // B.shape[1]
    B = B.repeat_interleave(group, dim=1)  # (batch, dim, N, L)
    C = C.repeat_interleave(group, dim=1)
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = [None] * seqlen
    order = range(seqlen - 1, -1, -1) if reverse else range(seqlen)
    for t in order:
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, :, :, t] * u[:, :, t, None]
        ys[t] = (h * C[:, :, :, t]).sum(-1)
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        y = y * F.silu(z.double())
    return y


def bidirectional_scan_oracle(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True):
    """Forward scan of direction 0 plus reverse scan of direction 1, each gated by silu(z), averaged."""
    fwd = selective_scan_oracle(u[:, 0], delta[:, 0], A[0], B[:, 0], C[:, 0], D[0], z, delta_bias[0],
                                delta_softplus)
    bwd = selective_scan_oracle(u[:, 1], delta[:, 1], A[1], B[:, 1], C[:, 1], D[1], z, delta_bias[1],
                                delta_softplus, reverse=True)
    return (fwd + bwd) / 2
