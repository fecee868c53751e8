"""The fused C++ CPU kernels as torch custom ops with autograd, and the public functions over them.

Semantics and shapes are those of :func:`vim.kernels.bidirectional_scan_ref` and
:func:`vim.kernels.bidirectional_conv_silu_ref`. Dtype policy: fp32 arithmetic and accumulation for fp32, bf16 and
fp16 inputs (upcast on entry), float64 in float64 (so the tests can compare with the reference in float64); each
output in its input's dtype. The kernels want the channel axis contiguous (SIMD across channels); the mixer's tensors
already are (in_proj's transposed output, this conv's output), others are copied once on entry. Outputs are written
token-major and returned as views with the documented shapes, which is the layout out_proj and x_proj read best.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from ..eager import direct_call, plain_eager
from ..reference import bidirectional_conv_silu_ref, bidirectional_scan_ref, delta_from_low_rank
from .build import load_extension

__all__ = ['bidirectional_scan_cpu', 'bidirectional_conv_silu_cpu', 'DEFAULT_CHUNK']

# Tokens between the states the forward saves for the backward, and the length of the backward's recompute tile
# (two tiles of chunk x dstate x 64 channels: 128 KiB each at 32 tokens and dstate 16, held in L2).
DEFAULT_CHUNK = 32
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def _channels_contiguous(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (..., channels, tokens) in ``dtype`` with channel stride 1 (a token-major copy when it is not)."""
    x = _as(x, dtype)
    if x.stride(-2) == 1 or x.shape[-2] == 1:
        return x
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


def _rows_contiguous(g: torch.Tensor) -> torch.Tensor:
    """A gradient of a token-major (..., tokens, channels) output, with channel stride 1."""
    return g if g.stride(-1) == 1 or g.shape[-1] == 1 else g.contiguous()


_SCAN_NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')
_CONV_NAMES = ('x', 'weight', 'bias')


def _check(op: str, tensors: tuple, shapes: tuple) -> None:
    """Each input a CPU tensor of a supported dtype and the expected shape (names from the op's signature)."""
    for i, (t, shape) in enumerate(zip(tensors, shapes)):
        if isinstance(t, torch.Tensor) and t.is_cpu and t.dtype in _DTYPES and t.shape == shape:
            continue
        name = (_SCAN_NAMES if op == 'scan' else _CONV_NAMES)[i]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f'{name} must be a tensor, got {type(t).__name__}')
        if t.device.type != 'cpu':
            raise RuntimeError(f"scan backend 'cpu' runs on CPU tensors; {name} is on {t.device}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: the CPU {op} takes float32, float64, bf16 or fp16, got {t.dtype}")
        raise ValueError(f'{op}: {name} must have shape {shape}, got {tuple(t.shape)}')


# ---- bidirectional scan -------------------------------------------------------------------------------------------
# Op-level layouts: u, delta (batch, 2, dim, L) and z (batch, dim, L) with channel stride 1; D and delta_bias (2, dim)
# contiguous; A (2, dim, N), B, C (batch, 2, N, L) any strides. Outputs token-major (documented in csrc/).

@torch.library.custom_op('vim::cpu_bidirectional_scan', mutates_args=())
def _scan_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, delta_softplus: bool, chunk: int,
             save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    outs = load_extension().scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, save)
    if not save:
        return outs[0], u.new_empty(0), u.new_empty(0)
    return tuple(outs)


@_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, save):
    batch, _, dim, seqlen = u.shape
    out = u.new_empty(batch, seqlen, dim)
    if not save:
        return out, u.new_empty(0), u.new_empty(0)
    states = u.new_empty(batch, 2, -(-seqlen // chunk) - 1, A.shape[2], dim)
    return out, u.new_empty(batch, seqlen, dim), states


@torch.library.custom_op('vim::cpu_bidirectional_scan_bwd', mutates_args=())
def _scan_bwd_op(gout: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor, D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, ysum: torch.Tensor,
                 states: torch.Tensor, delta_softplus: bool, chunk: int) -> list[torch.Tensor]:
    return load_extension().scan_bwd(gout, u, delta, A, B, C, D, z, delta_bias, ysum, states, delta_softplus, chunk)


@_scan_bwd_op.register_fake
def _(gout, u, delta, A, B, C, D, z, delta_bias, ysum, states, delta_softplus, chunk):
    batch, _, dim, seqlen = u.shape
    return [u.new_empty(batch, 2, seqlen, dim), u.new_empty(batch, 2, seqlen, dim), u.new_empty(batch, seqlen, dim),
            torch.empty_like(A, memory_format=torch.contiguous_format), u.new_empty(2, dim), u.new_empty(2, dim),
            u.new_empty(B.shape), u.new_empty(C.shape)]


def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, save = inputs
    if not save:
        raise RuntimeError('the CPU scan ran without saving chunk states; call bidirectional_scan_cpu')
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.delta_softplus = delta_softplus
    ctx.chunk = chunk


def _scan_backward(ctx, gout, _g_ysum, _g_states):
    u, delta, A, B, C, D, z, delta_bias, ysum, states = ctx.saved_tensors
    gu, gdelta, gz, gA, gD, gbias, gB, gC = _scan_bwd_op(
        _rows_contiguous(gout).transpose(1, 2), u, delta, A, B, C, D, z, delta_bias, ysum, states, ctx.delta_softplus,
        ctx.chunk)
    return gu.transpose(2, 3), gdelta.transpose(2, 3), gA, gB, gC, gD, gz.transpose(1, 2), gbias, None, None, None


_scan_op.register_autograd(_scan_backward, setup_context=_scan_setup_context)


@register_flop_formula(torch.ops.vim.cpu_bidirectional_scan)
def _scan_flops(u_shape, delta_shape, A_shape, *args, **kwargs) -> int:
    """As the reference scan's ops (vim.kernels.reference): 9 per (token, channel, state) and direction."""
    batch, _, dim, seqlen = u_shape
    return 9 * batch * 2 * dim * seqlen * A_shape[2]


@register_flop_formula(torch.ops.vim.cpu_bidirectional_scan_bwd)
def _scan_bwd_flops(gout_shape, u_shape, delta_shape, A_shape, *args, **kwargs) -> int:
    batch, _, dim, seqlen = u_shape
    return 27 * batch * 2 * dim * seqlen * A_shape[2]


def _needs_grad(*inputs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def _first_output(op, name: str, kernel: str, args: tuple, needs_grad: bool, x: torch.Tensor) -> torch.Tensor:
    """The forward's first output: through the custom ``op`` (named ``name``) saving for the backward when a gradient
    is needed, the extension's ``kernel`` called directly in plain eager mode (no dispatch cost), else the op."""
    if needs_grad:
        return op(*args, True)[0]
    if plain_eager(x):
        return direct_call(name, getattr(load_extension(), kernel), *args, False)[0]
    return op(*args, False)[0]


def bidirectional_scan_cpu(
        u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, delta_softplus: bool = True, *,
        chunk_size: int = DEFAULT_CHUNK, delta_proj_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Vim's bidirectional scan, both directions, D, the silu(z) gate and the average fused in one C++ op.

    Same arguments and result as :func:`vim.kernels.bidirectional_scan_ref`: u, delta (batch, 2, dim, seqlen),
    A (2, dim, dstate), B, C (batch, 2, dstate, seqlen), D, delta_bias (2, dim), z (batch, dim, seqlen) ->
    (batch, dim, seqlen) in u's dtype (a view of a token-major buffer). Inputs may be non-contiguous views.
    ``chunk_size`` is the spacing of the states saved for the backward pass (tests shrink it to cover several
    chunks); without autograd nothing is saved. With ``delta_proj_weight`` (2, dim, R), ``delta`` is the low-rank
    step (batch, 2, R, seqlen) (:func:`vim.kernels.reference.delta_from_low_rank`): without autograd, in eager mode,
    the kernel projects it token by token (no (batch, 2, dim, seqlen) delta is made); otherwise the full delta is
    computed first and the op runs as usual.
    """
    if delta_proj_weight is not None:
        if (delta.dim() != 4 or delta_proj_weight.dim() != 3 or delta.shape[2] != delta_proj_weight.shape[2]
                or delta.shape[2] == 0):
            raise ValueError(f'low-rank delta must be (batch, 2, R, seqlen) with delta_proj_weight (2, dim, R), '
                             f'R >= 1; got {tuple(delta.shape)}, {tuple(delta_proj_weight.shape)}')
        inputs = (u, delta, delta_proj_weight, A, B, C, D, z, delta_bias)
        if (u.dim() == 4 and A.dim() == 3 and u.numel() > 0 and A.shape[-1] > 0 and not _needs_grad(*inputs)
                and plain_eager(u)):
            return _scan_low_rank(*inputs, bool(delta_softplus))
        delta = delta_from_low_rank(delta, delta_proj_weight)
    if u.dim() != 4 or u.shape[1] != 2 or A.dim() != 3:
        raise ValueError(f'u must be (batch, 2, dim, seqlen) and A (2, dim, dstate), got {tuple(u.shape)}, '
                         f'{tuple(A.shape)}')
    batch, _, dim, seqlen = u.shape
    N = A.shape[2]
    act, par = (batch, 2, dim, seqlen), (2, dim)
    _check('scan', (u, delta, A, B, C, D, z, delta_bias),
           (act, act, (2, dim, N), (batch, 2, N, seqlen), (batch, 2, N, seqlen), par, (batch, dim, seqlen), par))
    if chunk_size < 1:
        raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
    if u.numel() == 0 or N == 0:
        return bidirectional_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    dtype = _compute_dtype(u)
    args = (_channels_contiguous(u, dtype), _channels_contiguous(delta, dtype), _as(A, dtype), _as(B, dtype),
            _as(C, dtype), _as(D, dtype).contiguous(), _channels_contiguous(z, dtype),
            _as(delta_bias, dtype).contiguous(), bool(delta_softplus), int(chunk_size))
    out = _first_output(_scan_op, 'vim::cpu_bidirectional_scan', 'scan_fwd', args,
                        _needs_grad(u, delta, A, B, C, D, z, delta_bias), u)
    return _as(out.transpose(1, 2), u.dtype)


def _scan_low_rank(u, dt, weight, A, B, C, D, z, delta_bias, delta_softplus: bool) -> torch.Tensor:
    """The inference kernel with dt_proj fused in (checked like the op's inputs; dt, weight any strides)."""
    batch, two, dim, seqlen = u.shape
    N, R = A.shape[2], dt.shape[2]
    act, par, states = (batch, 2, dim, seqlen), (2, dim), (batch, 2, N, seqlen)
    _check('scan', (u, dt, A, B, C, D, z, delta_bias),
           (act, (batch, 2, R, seqlen), (2, dim, N), states, states, par, (batch, dim, seqlen), par))
    if not (weight.is_cpu and weight.dtype in _DTYPES and weight.shape == (2, dim, R)):
        raise ValueError(f'delta_proj_weight must be a float CPU tensor of shape (2, {dim}, {R}), got '
                         f'{tuple(weight.shape)} {weight.dtype} on {weight.device}')
    dtype = _compute_dtype(u)
    out = direct_call(
        'vim::cpu_bidirectional_scan', load_extension().scan_fwd_lowrank, _channels_contiguous(u, dtype),
        _as(dt, dtype), _as(weight, dtype), _as(A, dtype), _as(B, dtype), _as(C, dtype), _as(D, dtype).contiguous(),
        _channels_contiguous(z, dtype), _as(delta_bias, dtype).contiguous(), delta_softplus)
    return _as(out.transpose(1, 2), u.dtype)


# ---- two-branch causal conv + silu --------------------------------------------------------------------------------
# Op-level layouts: x (batch, dim, L) with channel stride 1, weight (2, dim, width) any strides, bias (2, dim)
# contiguous;
# y and the saved pre-activation token-major (batch, 2, L, dim).

@torch.library.custom_op('vim::cpu_bidirectional_conv_silu', mutates_args=())
def _conv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, save: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    outs = load_extension().conv_fwd(x, weight, bias, save)
    return (outs[0], x.new_empty(0)) if not save else tuple(outs)


@_conv_op.register_fake
def _(x, weight, bias, save):
    batch, dim, seqlen = x.shape
    return x.new_empty(batch, 2, seqlen, dim), x.new_empty(batch, 2, seqlen, dim) if save else x.new_empty(0)


@torch.library.custom_op('vim::cpu_bidirectional_conv_silu_bwd', mutates_args=())
def _conv_bwd_op(gout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor) -> list[torch.Tensor]:
    return load_extension().conv_bwd(gout, x, weight, pre)


@_conv_bwd_op.register_fake
def _(gout, x, weight, pre):
    batch, dim, seqlen = x.shape
    return [x.new_empty(batch, seqlen, dim), torch.empty_like(weight, memory_format=torch.contiguous_format),
            x.new_empty(2, dim)]


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, save = inputs
    if not save:
        raise RuntimeError('the CPU conv ran without saving its pre-activation; call bidirectional_conv_silu_cpu')
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _conv_backward(ctx, gout, _g_pre):
    x, weight, pre = ctx.saved_tensors
    gx, gw, gb = _conv_bwd_op(_rows_contiguous(gout).transpose(2, 3), x, weight, pre)
    return gx.transpose(1, 2), gw, gb, None


_conv_op.register_autograd(_conv_backward, setup_context=_conv_setup_context)


def bidirectional_conv_silu_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Vim's causal depthwise conv + silu of both branches in one C++ op.

    Same arguments and result as :func:`vim.kernels.bidirectional_conv_silu_ref`: x (batch, dim, seqlen), weight
    (2, dim, width), bias (2, dim) -> (batch, 2, dim, seqlen) in x's dtype (a view with channel stride 1, the layout
    the CPU scan reads); computed in fp32 (float64 for float64). x may be a non-contiguous view.
    """
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[2] < 1:
        raise ValueError(f'expected x (batch, dim, seqlen), weight (2, dim, width), bias (2, dim); got '
                         f'{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(bias.shape)}')
    dim = x.shape[1]
    _check('conv', (x, weight, bias), (tuple(x.shape), (2, dim, weight.shape[2]), (2, dim)))
    if x.numel() == 0:
        return bidirectional_conv_silu_ref(x, weight, bias)
    dtype = _compute_dtype(x)
    args = (_channels_contiguous(x, dtype), _as(weight, dtype), _as(bias, dtype).contiguous())
    y = _first_output(_conv_op, 'vim::cpu_bidirectional_conv_silu', 'conv_fwd', args, _needs_grad(x, weight, bias), x)
    return _as(y.transpose(2, 3), x.dtype)
