"""Selective scan in plain PyTorch: the specification every fast kernel is tested against, and the CPU path.

Recurrence, per batch b, channel d and state n (mamba_ssm's ``selective_scan_fn`` semantics)::

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = <C_t, h_t> + D * u_t,    out_t = y_t * silu(z_t)

Shapes: ``u, delta, z: (batch, dim, seqlen)``, ``A: (dim, dstate)``, ``B, C: (batch, dstate, seqlen)`` or
``(batch, groups, dstate, seqlen)`` with ``dim`` split evenly into ``groups``, or ``(dim, dstate)`` time-invariant,
``D, delta_bias: (dim,)``. Real A only (mamba_ssm's complex mode is refused with an error).
Dtype policy: inputs in the activation dtype, everything computed and accumulated in fp32, output cast back.

Speed on CPU comes from doing every elementwise step on whole time-chunks at once, so that the only Python-level
loop is one fused ``addcmul_`` per token over a contiguous ``(batch, dim, dstate)`` slab. No ``exp(-cumsum)``
factorisation is used: each factor is a product of decays <= 1, so the scan is as safe as the sequential loop
for strong decay and long sequences. Backward recomputes the hidden states chunk by chunk from saved chunk-start
states instead of storing them (the same plan the Triton kernels follow).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

__all__ = ['selective_scan_ref', 'bidirectional_scan_ref', 'bidirectional_conv_silu_ref', 'delta_from_low_rank',
           'per_direction_matmul']

# Elements of one (chunk, batch, dim, dstate) work buffer: large enough to amortise the per-token loop,
# small enough to stay in cache and to bound memory at long sequence lengths.
_CHUNK_ELEMENTS = 1 << 18


def _chunk_len(batch: int, dim: int, dstate: int, seqlen: int) -> int:
    return max(1, min(seqlen, _CHUNK_ELEMENTS // max(1, batch * dim * dstate)))


def _num_chunks(seqlen: int, T: int) -> int:
    return -(-seqlen // T)


def _chunk_inputs(delta: torch.Tensor, du: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor,
                  dA: torch.Tensor, dBu: torch.Tensor) -> None:
    """Decays and inputs of one chunk, written into the time-major work buffers dA and dBu.

    delta, du: (T, b, dim); A: (dim, N); Bt: (T, b, G, N); dA, dBu: (T, b, dim, N), contiguous.
    Reusing two buffers for every chunk keeps the working set in cache and avoids fresh page faults.
    """
    T, b, dim = du.shape
    groups = Bt.shape[2]
    torch.mul(delta.unsqueeze(-1), A, out=dA).exp_()
    torch.mul(du.view(T, b, groups, dim // groups, 1), Bt.unsqueeze(3), out=dBu.view(T, b, groups, dim // groups, -1))


def _recurrence_(H: torch.Tensor, dA: torch.Tensor, h0: torch.Tensor | None) -> None:
    """In place: H[t] = dA[t] * H[t-1] + H[t] with H[-1] = h0.  H, dA: (T, b, dim, N)."""
    hs, decays = H.unbind(0), dA.unbind(0)  # one C++ call instead of an index op per token
    if h0 is not None:
        hs[0].addcmul_(decays[0], h0)
    for t in range(1, len(hs)):
        hs[t].addcmul_(decays[t], hs[t - 1])


def _contract(H: torch.Tensor, Ct: torch.Tensor) -> torch.Tensor:
    """y[t, b, d] = sum_n H[t, b, d, n] * C[t, b, g(d), n].  H: (T, b, dim, N), Ct: (T, b, G, N) -> (T, b, dim)."""
    T, b, dim, N = H.shape
    G = Ct.shape[2]
    # einsum lowers this to one batched (1 x N) @ (N x dim/G) product, ~3x faster on CPU than the matvec form.
    return torch.einsum('tbgdn,tbgn->tbgd', H.view(T, b, G, dim // G, N), Ct).reshape(T, b, dim)


# The core recurrence is a pair of torch custom ops (forward, backward): opaque to torch.compile (no unrolled
# per-token graph), countable by torch.utils.flop_counter, and the same code on every device.
# Shapes, time-major: u, delta: (L, b, dim); A: (dim, N); B, C: (L, b, G, N); y: (L, b, dim);
# states: (num_chunks, b, dim, N), the state after each chunk: the backward pass starts chunk c + 1 from states[c],
# and states[-1] is the last state (its gradient, the only one of the states used, flows back).


@torch.library.custom_op('vim::selective_scan_fwd', mutates_args=())
def _scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              T: int) -> tuple[torch.Tensor, torch.Tensor]:
    L, b, dim = u.shape
    N = B.shape[3]
    du = delta * u
    y = u.new_empty(L, b, dim)
    states = u.new_empty(_num_chunks(L, T), b, dim, N)
    dA_buf, H_buf = u.new_empty(2, T, b, dim, N)
    h = None
    for ci, s in enumerate(range(0, L, T)):
        e = min(s + T, L)
        dA, H = dA_buf[:e - s], H_buf[:e - s]
        _chunk_inputs(delta[s:e], du[s:e], A, B[s:e], dA, H)
        _recurrence_(H, dA, h)
        y[s:e] = _contract(H, C[s:e])
        h = states[ci].copy_(H[-1])
    return y, states


@_scan_fwd.register_fake
def _(u, delta, A, B, C, T):
    L, b, dim = u.shape
    return u.new_empty(L, b, dim), u.new_empty(_num_chunks(L, T), b, dim, B.shape[3])


@torch.library.custom_op('vim::selective_scan_bwd', mutates_args=())
def _scan_bwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              states: torch.Tensor, gy: torch.Tensor, g_last: Optional[torch.Tensor], T: int  # noqa: UP045
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    L, b, dim = u.shape
    G, N = B.shape[2], B.shape[3]
    gy = gy.contiguous()
    starts = [None] + list(states[:-1].unbind(0))
    du = delta * u
    g_du = torch.empty_like(u)
    g_ddelta_decay = torch.empty_like(u)
    gA = torch.zeros_like(A)
    gB = torch.empty_like(B)
    gC = torch.empty_like(C)
    dA_buf, H_buf, gH_buf = u.new_empty(3, T, b, dim, N)
    carry = g_last  # the gradient reaching the last state of the chunk: dA_{e} * gH_{e} from the next one
    for ci in reversed(range(len(starts))):
        s = ci * T
        e = min(s + T, L)
        Tc = e - s
        h0 = starts[ci]
        dA, H, gH = dA_buf[:Tc], H_buf[:Tc], gH_buf[:Tc]
        _chunk_inputs(delta[s:e], du[s:e], A, B[s:e], dA, H)
        _recurrence_(H, dA, h0)
        gy_c = gy[s:e].view(Tc, b, G, dim // G)
        Hg = H.view(Tc, b, G, dim // G, N)
        gC[s:e] = torch.einsum('tbgdn,tbgd->tbgn', Hg, gy_c)
        gHg = gH.view(Tc, b, G, dim // G, N)
        torch.mul(gy_c.unsqueeze(-1), C[s:e].unsqueeze(3), out=gHg)
        if carry is not None:
            gH[-1].add_(carry)
        gs, decays = gH.unbind(0), dA.unbind(0)
        for t in range(Tc - 2, -1, -1):
            gs[t].addcmul_(decays[t + 1], gs[t + 1])
        carry = dA[0] * gH[0]
        # d/dlog(dA_t) = gH_t * dA_t * h_{t-1}, with log(dA_t) = delta_t * A; dA's buffer is free now.
        g_log = dA.mul_(gH)
        g_log[1:].mul_(H[:-1])
        if h0 is None:
            g_log[0].zero_()
        else:
            g_log[0].mul_(h0)
        g_ddelta_decay[s:e] = torch.matmul(g_log.view(Tc, b, dim, 1, N), A.unsqueeze(-1)).view(Tc, b, dim)
        gA += torch.einsum('tbdn,tbd->dn', g_log, delta[s:e])
        g_du[s:e] = torch.matmul(gHg, B[s:e].unsqueeze(-1)).view(Tc, b, dim)
        gB[s:e] = torch.einsum('tbgdn,tbgd->tbgn', gHg, du[s:e].view(Tc, b, G, -1))
    g_u = g_du * delta
    g_delta = g_du * u + g_ddelta_decay
    return g_u, g_delta, gA, gB, gC


@_scan_bwd.register_fake
def _(u, delta, A, B, C, states, gy, g_last, T):
    return (torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A), torch.empty_like(B),
        torch.empty_like(C))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, T = inputs
    ctx.save_for_backward(u, delta, A, B, C, output[1])
    ctx.chunk = T


def _backward(ctx, gy, g_states):
    u, delta, A, B, C, states = ctx.saved_tensors
    g_last = None if g_states is None else g_states[-1]
    return (*_scan_bwd(u, delta, A, B, C, states, gy.contiguous(), g_last, ctx.chunk), None)


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.vim.selective_scan_fwd)
def _scan_fwd_flops(u_shape, delta_shape, A_shape, B_shape, C_shape, T, *args, **kwargs) -> int:
    """mamba_ssm's count for a selective scan: 9 per (token, channel, state), exp counted as one."""
    L, b, dim = u_shape
    return 9 * L * b * dim * A_shape[1]


@register_flop_formula(torch.ops.vim.selective_scan_bwd)
def _scan_bwd_flops(u_shape, delta_shape, A_shape, *args, **kwargs) -> int:
    """Recompute (9) plus the reverse recurrence and the five gradient contractions (~18) per element."""
    L, b, dim = u_shape
    return 27 * L * b * dim * A_shape[1]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for every activation dtype; float64 stays float64 so that gradcheck can run on the reference."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _to_time_major(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, ..., seqlen) -> (seqlen, batch, ...) contiguous."""
    return x.to(dtype).movedim(-1, 0).contiguous()


def _check_scan_inputs(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None) -> None:
    """One clear error for inputs mamba_ssm's selective scan would refuse, or whose meaning we do not implement."""
    if any(t is not None and t.is_complex() for t in (u, delta, A, B, C, D, z, delta_bias)):
        raise NotImplementedError(
            "complex inputs (mamba_ssm's complex-A mode, with B/C as interleaved real/imaginary pairs) are not "
            'supported: vim implements the real selective scan only')
    if u.dim() != 3:
        raise ValueError(f'u must be (batch, dim, seqlen), got {tuple(u.shape)}')
    batch, dim, seqlen = u.shape
    for name, t in (('delta', delta), ('z', z)):
        if t is not None and t.shape != u.shape:
            raise ValueError(f'{name} must have the shape of u {tuple(u.shape)}, got {tuple(t.shape)}')
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f'A must be (dim={dim}, dstate), got {tuple(A.shape)}')
    dstate = A.shape[1]
    for name, t in (('D', D), ('delta_bias', delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f'{name} must be (dim={dim},), got {tuple(t.shape)}')
    for name, t in (('B', B), ('C', C)):
        if t.dim() == 2:
            ok = tuple(t.shape) == (dim, dstate)
        elif t.dim() in (3, 4):
            groups = 1 if t.dim() == 3 else t.shape[1]
            ok = (t.shape[0], t.shape[-2], t.shape[-1]) == (batch, dstate, seqlen) and groups > 0 and not dim % groups
        else:
            ok = False
        if not ok:
            raise ValueError(
                f'{name} must be (batch={batch}, dstate={dstate}, seqlen={seqlen}), (batch, groups, dstate, seqlen) '
                f'with dim={dim} divisible by groups, or time-invariant (dim, dstate); got {tuple(t.shape)}')


def _per_group(x: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """B or C as (batch, groups, dstate, seqlen); time-invariant (dim, dstate) becomes one group per channel."""
    if x.dim() == 2:
        return x[None, :, :, None].expand(batch, -1, -1, seqlen)
    return x.unsqueeze(1) if x.dim() == 3 else x


def selective_scan_ref(
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
        delta_bias: torch.Tensor | None = None,
        delta_softplus: bool = False,
        return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan over the sequence, first token to last (mamba_ssm's ``selective_scan_fn``, real A).

    Args:
        u: (batch, dim, seqlen) input.
        delta: (batch, dim, seqlen) step sizes, before ``delta_bias`` and softplus.
        A: (dim, dstate) state matrix (negative for a stable scan).
        B, C: (batch, dstate, seqlen) or (batch, groups, dstate, seqlen) input/output projections, or (dim, dstate)
            time-invariant. B and C with different group counts (or one time-invariant) run with one group per
            channel, i.e. with (batch, dim, dstate, seqlen) copies.
        D: (dim,) skip connection. z: (batch, dim, seqlen) gate, applied as ``y * silu(z)``.
        delta_bias: (dim,) added to delta before softplus.
        delta_softplus: apply softplus to delta.
        return_last_state: also return the hidden state after the last token.
    Returns:
        (batch, dim, seqlen) in u's dtype; with ``return_last_state``, also the last state (batch, dim, dstate) in
        the compute dtype (fp32, or fp64 for fp64 inputs), differentiable.
    Raises:
        ValueError for shapes that do not fit together; NotImplementedError for complex inputs.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    batch, dim, seqlen = u.shape
    B, C = _per_group(B, batch, seqlen), _per_group(C, batch, seqlen)
    if B.shape[1] != C.shape[1]:
        B, C = (x.repeat_interleave(dim // x.shape[1], dim=1) for x in (B, C))
    dtype = _compute_dtype(u)
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    u_t = _to_time_major(u, dtype)
    # an exported graph keeps the batch size symbolic: its chunk length must not depend on it
    T = _chunk_len(1 if torch.compiler.is_exporting() else batch, dim, A.shape[1], seqlen)
    y, states = _scan_fwd(u_t, _to_time_major(delta, dtype), A.to(dtype).contiguous(), _to_time_major(B, dtype),
                          _to_time_major(C, dtype), T)
    y = y.permute(1, 2, 0)
    if D is not None:
        y = y + u.to(dtype) * D.to(dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(dtype))
    y = y.to(dtype_in)
    return (y, states[-1]) if return_last_state else y


def _merge_directions(x: torch.Tensor) -> torch.Tensor:
    """(batch, 2, ..., seqlen) -> forward half and time-reversed backward half, concatenated on dim 1."""
    return torch.cat([x[:, 0], x[:, 1].flip(-1)], dim=1)


def bidirectional_scan_ref(
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor,
        z: torch.Tensor,
        delta_bias: torch.Tensor,
        delta_softplus: bool = True,
) -> torch.Tensor:
    """Vim's bidirectional scan: a forward scan and a last-to-first scan, each gated by silu(z), averaged.

    Both directions take their inputs in natural token order; index 1 of the direction axis is scanned from the
    last token to the first.

    Args:
        u, delta: (batch, 2, dim, seqlen). A: (2, dim, dstate). B, C: (batch, 2, dstate, seqlen).
        D, delta_bias: (2, dim). z: (batch, dim, seqlen), shared by both directions.
    Returns:
        (batch, dim, seqlen) = silu(z) * (y_forward + y_backward) / 2, in u's dtype.
    """
    dim = u.shape[2]
    # Both directions run as one scan with 2 * dim channels in two groups, the backward half time-reversed.
    y = selective_scan_ref(
        _merge_directions(u), _merge_directions(delta), A.reshape(2 * dim, -1),
        torch.stack([B[:, 0], B[:, 1].flip(-1)], dim=1), torch.stack([C[:, 0], C[:, 1].flip(-1)], dim=1),
        D=D.reshape(-1), delta_bias=delta_bias.reshape(-1), delta_softplus=delta_softplus)
    dtype = _compute_dtype(u)
    y = y.to(dtype)
    y = (y[:, :dim] + y[:, dim:].flip(-1)) * F.silu(z.to(dtype)) * 0.5
    return y.to(u.dtype)


def bidirectional_conv_silu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Causal depthwise conv + silu of Vim's two branches, both returned in natural token order.

    Branch 0 convolves the sequence causally; branch 1 convolves the reversed sequence causally, which equals an
    anti-causal conv of the natural sequence with the kernel flipped: one grouped conv serves both, without flipped
    copies of the input. Computed in x's dtype, as ``nn.Conv1d`` + ``F.silu`` would.

    Args:
        x: (batch, dim, seqlen). weight: (2, dim, width), tap ``width - 1`` on the current token.
        bias: (2, dim).
    Returns:
        (batch, 2, dim, seqlen) in x's dtype.
    """
    dim, width = weight.shape[1], weight.shape[2]
    if x.dim() != 3 or x.shape[1] != dim or weight.shape[0] != 2 or tuple(bias.shape) != (2, dim):
        raise ValueError(f'expected x (batch, {dim}, seqlen), weight (2, dim, width), bias (2, dim); got '
                         f'{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(bias.shape)}')
    w = torch.cat([weight[0], weight[1].flip(-1)], dim=0).unsqueeze(1).to(x.dtype)
    y = F.conv1d(torch.cat([x, x], dim=1), w, bias.reshape(-1).to(x.dtype), padding=width - 1, groups=2 * dim)
    L = x.shape[-1]
    return F.silu(torch.stack([y[:, :dim, :L], y[:, dim:, width - 1:width - 1 + L]], dim=1))


def per_direction_matmul(x: torch.Tensor, weight: torch.Tensor,
                         split: list[int] | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """A projection of each branch: x (batch, 2, K, seqlen), weight (2, M, K) -> (batch, 2, M, seqlen),
    ``out[b, g] = weight[g] @ x[b, g]``; with ``split`` (sizes summing to M), its parts along M as a tuple of views.

    Computed in the layout x arrives in. A token-major x (stride 1 along K) is projected token by token, into a
    token-major result (stride 1 along M). If each branch's (batch, seqlen) tokens fold into one axis
    (direction-major memory, ``(2, batch, seqlen, K)``: the Triton conv's output, and this function's), that is one
    (batch * seqlen, K) @ (K, M) GEMM a branch on x in place, with a direction-major result, split before its
    tokens are unfolded, so that the parts' gradients meet in the GEMM's layout without a copy. Otherwise a matmul
    batched over (batch, branch), which copies x whole unless those two axes fold (the CPU conv's (batch, 2, seqlen,
    K) does). Any other x gives a contiguous channel-major result. Same values every way, up to the GEMM's summation
    order.
    """
    if x.stride(-2) == 1 and x.shape[-1] > 1:
        rows = x.permute(1, 0, 3, 2)  # (2, batch, seqlen, K)
        _, batch, seqlen, k = rows.shape
        if batch == 1 or rows.stride(1) == seqlen * rows.stride(2):
            out = torch.bmm(rows.reshape(2, batch * seqlen, k), weight.transpose(1, 2))  # a view: the axes fold
            parts = out.split(split, dim=-1) if split is not None else (out,)
            parts = tuple(p.view(2, batch, seqlen, -1).permute(1, 0, 3, 2) for p in parts)
            return parts if split is not None else parts[0]
        out = torch.matmul(x.transpose(-1, -2), weight.transpose(-1, -2)).transpose(-1, -2)
    else:
        out = torch.einsum('bgkl,gmk->bgml', x, weight)
    return out.split(split, dim=2) if split is not None else out


def delta_from_low_rank(dt: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Vim's step sizes from their low-rank form (its dt_proj): dt (batch, 2, R, seqlen), weight (2, dim, R) ->
    delta (batch, 2, dim, seqlen), ``delta[b, g] = weight[g] @ dt[b, g]``, in the layout dt arrives in
    (:func:`per_direction_matmul`: token-major dt, as x_proj's output is, gives a delta with channel stride 1, the
    layout the CPU and Triton scans read).
    """
    return per_direction_matmul(dt, weight)
