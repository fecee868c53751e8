"""The fused bidirectional selective scan as an autograd op: input guard, ``autograd.Function``, public function.

Semantics, shapes and dtype policy are those of :func:`vim.kernels.bidirectional_scan_ref`: inputs in the
activation dtype (fp32, bf16 or fp16; A, D and delta_bias usually fp32), every load upcast to fp32, all arithmetic
and accumulation in fp32, the output in u's dtype and each gradient in its input's dtype.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.flop_counter import register_flop_formula

from ..eager import direct_call, plain_eager
from ..reference import bidirectional_conv_silu_ref
from .bwd import bc_grad, scan_bwd
from .common import INTERPRET
from .conv import check_width, conv_bwd, conv_fwd, conv_input_grad, conv_output
from .fwd import MAX_DSTATE, channel_contiguous, direction_major, scan_fwd, scan_output

__all__ = ['bidirectional_scan_triton', 'bidirectional_conv_silu_triton', 'check_device', 'DEFAULT_CHUNK']

# Tokens per chunk: the spacing of the states the forward saves, and the backward's tile (a thread holds CHUNK tokens
# of its channel in registers, its per-token code unrolled: 8 compiles without spills for sm_90; at 16 ptxas had not
# finished after 10 minutes). The saved states cost 2 x dstate x 4 / CHUNK bytes per (token, channel): 16 at 8.
DEFAULT_CHUNK = 8
MAX_CHUNK = 8
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_device(device: torch.device) -> None:
    """Raise unless the Triton kernels can run on ``device``: CUDA, or CPU under TRITON_INTERPRET=1."""
    if device.type == 'cuda':
        if INTERPRET:
            raise RuntimeError('the Triton scan was imported with TRITON_INTERPRET=1, which runs kernels on CPU '
                               'tensors only; unset it (before importing) to run on CUDA')
        return
    if device.type == 'cpu' and INTERPRET:
        return
    hint = ' (CPU tensors need TRITON_INTERPRET=1, set before this module is imported)' if device.type == 'cpu' else ''
    raise RuntimeError(f'the Triton scan needs CUDA tensors, got {device}{hint}')


def _check_tensors(op: str, named: dict) -> None:
    """Each value a tensor of a supported dtype, all on the device of the first."""
    first, device = next(iter(named.items()))[0], next(iter(named.values())).device
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f'{name} must be a tensor, got {type(t).__name__}')
        if t.dtype not in _DTYPES:
            raise TypeError(f'{name}: the Triton {op} takes fp32, bf16 or fp16, got {t.dtype}')
        if t.device != device:
            raise ValueError(f'{name} is on {t.device}, {first} on {device}')


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    """Shapes, dtypes and devices, checked once at the autograd boundary instead of inside each kernel launcher."""
    named = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    _check_tensors('scan', named)
    if u.dim() != 4 or u.shape[1] != 2:
        raise ValueError(f'u must be (batch, 2, dim, seqlen), got {tuple(u.shape)}')
    batch, _, dim, seqlen = u.shape
    dstate = A.shape[-1] if A.dim() == 3 and A.shape[-1] > 0 else -1
    expected = dict(delta=(batch, 2, dim, seqlen), A=(2, dim, dstate), B=(batch, 2, dstate, seqlen),
                    C=(batch, 2, dstate, seqlen), D=(2, dim), z=(batch, dim, seqlen), delta_bias=(2, dim))
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(f'{name} must have shape {shape} for u of shape {tuple(u.shape)} and A of shape '
                             f'{tuple(A.shape)}, got {tuple(named[name].shape)}')
    if dstate > MAX_DSTATE:
        raise ValueError(f'the Triton scan takes d_state <= {MAX_DSTATE} (Vim and Mamba use 16), got {dstate}: '
                         "use backend='reference' (or 'mamba_ssm')")
    check_device(u.device)


def _check_conv_inputs(x, weight, bias) -> None:
    _check_tensors('conv', dict(x=x, weight=weight, bias=bias))
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[:2] != (2, x.shape[1]) or tuple(bias.shape) != (2, x.shape[1]):
        raise ValueError(f'expected x (batch, dim, seqlen), weight (2, dim, width), bias (2, dim); got '
                         f'{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(bias.shape)}')
    if weight.shape[2] < 1:
        raise ValueError(f'conv width must be >= 1, got weight {tuple(weight.shape)}')
    check_width(weight)
    check_device(x.device)


def _device_context(device: torch.device):
    """Launch on the inputs' GPU, not the current one (fla's input_guard does the same)."""
    return torch.cuda.device(device) if device.type == 'cuda' else contextlib.nullcontext()


def _on_inputs_device(launch):
    """``launch`` run on its first tensor argument's device (the others are on it: the guards checked)."""
    @functools.wraps(launch)
    def guarded(first, *args, **kwargs):
        with _device_context(first.device):
            return launch(first, *args, **kwargs)
    return guarded


_scan_fwd, _scan_bwd, _conv_fwd, _conv_bwd = (_on_inputs_device(f) for f in (scan_fwd, scan_bwd, conv_fwd, conv_bwd))


# The kernels run inside torch custom ops (forward and backward each), so that torch.compile treats them as opaque
# nodes (no graph break, no tracing into Triton launches), torch.utils.flop_counter can count them, and autograd
# comes from register_autograd. Plain eager calls skip the ops' dispatch for the same kernels (_EagerScan, _EagerConv
# below; vim.kernels.eager).

@torch.library.custom_op('vim::triton_bidirectional_scan', mutates_args=())
def _scan_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, delta_softplus: bool, chunk: int,
             store_states: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, states, ysum = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, store_states=store_states)
    if states is None:
        return out, u.new_empty(0, dtype=torch.float32), u.new_empty(0)
    return out, states, ysum


@_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, store_states):
    batch, _, dim, seqlen = u.shape
    out = scan_output(u)
    if not store_states:
        return out, u.new_empty(0, dtype=torch.float32), u.new_empty(0)
    return (out, u.new_empty(batch, 2, -(-seqlen // chunk) - 1, dim, A.shape[-1], dtype=torch.float32),
            scan_output(u))


@torch.library.custom_op('vim::triton_bidirectional_scan_bwd', mutates_args=())
def _scan_bwd_op(gout: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor, D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, states: torch.Tensor,
                 ysum: torch.Tensor, delta_softplus: bool, chunk: int) -> list[torch.Tensor]:
    return list(_scan_bwd(gout, u, delta, A, B, C, D, z, delta_bias, states, ysum, delta_softplus, chunk))


@_scan_bwd_op.register_fake
def _(gout, u, delta, A, B, C, D, z, delta_bias, states, ysum, delta_softplus, chunk):
    return _scan_grads_like(u, delta, A, B, C, D, z, delta_bias)


def _scan_grads_like(u, delta, A, B, C, D, z, delta_bias) -> list[torch.Tensor]:
    """Empty gradients of the scan's inputs in the layouts ``bwd.scan_bwd`` returns."""
    batch, _, dim, seqlen = u.shape
    # as the kernel writes them: u's and delta's direction-major, z's channel-contiguous
    owned = [direction_major(batch, dim, seqlen, u.device, t.dtype) for t in (u, delta)]
    shared = [torch.empty_like(A, memory_format=torch.contiguous_format), bc_grad(B), bc_grad(C),
              torch.empty_like(D, memory_format=torch.contiguous_format)]
    return [*owned, *shared, channel_contiguous(batch, (), dim, seqlen, u.device, z.dtype),
            torch.empty_like(delta_bias, memory_format=torch.contiguous_format)]


def _recompute_and_bwd(gout, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, chunk: int):
    """The backward of a forward that saved no chunk states: the forward runs again to write them (and ysum), for
    this layer only, then the backward as usual."""
    _, states, ysum = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, store_states=True)
    return _scan_bwd(gout, u, delta, A, B, C, D, z, delta_bias, states, ysum, delta_softplus, chunk)


@torch.library.custom_op('vim::triton_bidirectional_scan_bwd_recompute', mutates_args=())
def _scan_bwd_recompute_op(gout: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
                           B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, z: torch.Tensor,
                           delta_bias: torch.Tensor, delta_softplus: bool, chunk: int) -> list[torch.Tensor]:
    return list(_recompute_and_bwd(gout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk))


@_scan_bwd_recompute_op.register_fake
def _(gout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk):
    return _scan_grads_like(u, delta, A, B, C, D, z, delta_bias)


def _save_scan(ctx, inputs: tuple, states, ysum, delta_softplus: bool, chunk: int, recompute: bool) -> None:
    """What the scan's backward needs: its eight inputs, and the chunk states and ysum unless it writes them again
    (``recompute_states``). Shared by the custom op and the eager Function."""
    ctx.save_for_backward(*inputs, *(() if recompute else (states, ysum)))
    ctx.delta_softplus, ctx.chunk, ctx.recompute = delta_softplus, chunk, recompute


def _scan_grads(ctx, gout, recompute_and_bwd, bwd) -> tuple:
    """The backward's gradients through ``recompute_and_bwd`` or ``bwd`` (the custom ops or their kernels)."""
    if ctx.recompute:
        grads = recompute_and_bwd(gout, *ctx.saved_tensors, ctx.delta_softplus, ctx.chunk)
    else:
        grads = bwd(gout, *ctx.saved_tensors, ctx.delta_softplus, ctx.chunk)
    return (*grads, None, None, None)


def _scan_setup_context(ctx, inputs, output):
    *tensors, delta_softplus, chunk, store_states = inputs
    # without store_states under autograd: recompute_states, the chunk states written again by the backward
    _save_scan(ctx, tuple(tensors), output[1], output[2], delta_softplus, chunk, recompute=not store_states)
    ctx.mark_non_differentiable(output[1], output[2])
    # else autograd hands the backward zero gradients of the states and ysum: a states-sized fill every layer (0.09 ms
    # of a 2.1 ms backward at 8 x 6,085 tokens on an H100, fifth run)
    ctx.set_materialize_grads(False)


def _scan_backward(ctx, gout, _g_states, _g_ysum):  # gout is always defined: the only differentiable output
    return _scan_grads(ctx, gout, _scan_bwd_recompute_op, _scan_bwd_op)


_scan_op.register_autograd(_scan_backward, setup_context=_scan_setup_context)


@torch.library.custom_op('vim::triton_bidirectional_conv_silu', mutates_args=())
def _conv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _conv_fwd(x, weight, bias)


@_conv_op.register_fake
def _(x, weight, bias):
    return conv_output(x)


@torch.library.custom_op('vim::triton_bidirectional_conv_silu_bwd', mutates_args=())
def _conv_bwd_op(gout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _conv_bwd(gout, x, weight, bias)


@_conv_bwd_op.register_fake
def _(gout, x, weight, bias):
    return (conv_input_grad(x), *(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (weight, bias)))


def _conv_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _conv_backward(ctx, gout):
    return _conv_bwd_op(gout, *ctx.saved_tensors)


_conv_op.register_autograd(_conv_backward, setup_context=_conv_setup_context)


class _EagerScan(torch.autograd.Function):
    """The scan op's autograd without its dispatch, for plain eager calls (``vim.kernels.eager``): the same kernels,
    the same saved tensors, the same gradients."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, chunk: int, recompute: bool):
        inputs = (u, delta, A, B, C, D, z, delta_bias)
        out, states, ysum = _scan_fwd(*inputs, delta_softplus, chunk, store_states=not recompute)
        _save_scan(ctx, inputs, states, ysum, delta_softplus, chunk, recompute)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):
        return _scan_grads(ctx, gout, _recompute_and_bwd, _scan_bwd)


def _scan_inference(*args) -> torch.Tensor:
    """The forward alone, for plain eager calls without autograd: no chunk states written."""
    return _scan_fwd(*args, store_states=False)[0]


class _EagerConv(torch.autograd.Function):
    """The conv op's autograd without its dispatch, for plain eager calls."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return _conv_fwd(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):
        return _conv_bwd(gout, *ctx.saved_tensors)


@register_flop_formula(torch.ops.vim.triton_bidirectional_scan)
def _scan_flops(u_shape, delta_shape, A_shape, *args, **kwargs) -> int:
    """As the reference scan's ops (vim.kernels.reference): 9 per (token, channel, state) and direction."""
    batch, _, dim, seqlen = u_shape
    return 9 * batch * 2 * dim * seqlen * A_shape[-1]


@register_flop_formula(torch.ops.vim.triton_bidirectional_scan_bwd)
def _scan_bwd_flops(gout_shape, u_shape, delta_shape, A_shape, *args, **kwargs) -> int:
    batch, _, dim, seqlen = u_shape
    return 27 * batch * 2 * dim * seqlen * A_shape[-1]


@register_flop_formula(torch.ops.vim.triton_bidirectional_scan_bwd_recompute)
def _scan_bwd_recompute_flops(gout_shape, u_shape, delta_shape, A_shape, *args, **kwargs) -> int:
    """The forward again (9) and the backward (27) per (token, channel, state) and direction."""
    batch, _, dim, seqlen = u_shape
    return 36 * batch * 2 * dim * seqlen * A_shape[-1]


def _needs_grad(*inputs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def bidirectional_scan_triton(
        u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, delta_softplus: bool = True, *,
        chunk_size: int = DEFAULT_CHUNK, recompute_states: bool = False,
) -> torch.Tensor:
    """Vim's bidirectional scan, both directions and the gate fused into one Triton op.

    Same arguments and result as :func:`vim.kernels.bidirectional_scan_ref`: u, delta (batch, 2, dim, seqlen),
    A (2, dim, dstate), B, C (batch, 2, dstate, seqlen), D, delta_bias (2, dim), z (batch, dim, seqlen) ->
    (batch, dim, seqlen) in u's dtype, a transposed view of channel-contiguous (batch, seqlen, dim) memory (what
    out_proj reads). Inputs may be non-contiguous views. ``chunk_size`` (a power of two, 2 to 8) is the
    scan tile length and the spacing of the saved states; tests shrink it to cover several chunks cheaply.
    Without autograd (inference) no chunk states are written. ``recompute_states``: under autograd, save only the
    inputs and let the backward run the forward again to write the chunk states (fp32, 2 x dstate x 4 / chunk_size
    bytes per (token, channel): 16 at the default 8, four times u's in bf16) for the layer it is in: a model's training
    peak then holds one layer's states instead of every layer's, for one more forward scan in each backward. The
    gradients are the same, bit for bit.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if chunk_size < 2 or chunk_size > MAX_CHUNK or chunk_size & (chunk_size - 1):
        raise ValueError(f'chunk_size must be a power of two from 2 to {MAX_CHUNK}, got {chunk_size}')
    if u.numel() == 0:  # nothing to launch; keep the (empty) result attached to the graph
        return (u.sum(1) + z).to(u.dtype)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    needs_grad = _needs_grad(*inputs)
    if plain_eager(u):  # past the custom op's dispatch (vim.kernels.eager)
        if needs_grad:
            return direct_call('vim::triton_bidirectional_scan', _EagerScan.apply, *inputs, bool(delta_softplus),
                               int(chunk_size), bool(recompute_states))
        return direct_call('vim::triton_bidirectional_scan', _scan_inference, *inputs, bool(delta_softplus),
                           int(chunk_size))
    store_states = needs_grad and not recompute_states  # without it the backward writes them
    out, _, _ = _scan_op(*inputs, bool(delta_softplus), int(chunk_size), store_states)
    return out


def bidirectional_conv_silu_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Vim's causal depthwise conv + silu of both branches in one Triton op.

    Same arguments and result as :func:`vim.kernels.bidirectional_conv_silu_ref`: x (batch, dim, seqlen), weight
    (2, dim, width), bias (2, dim) -> (batch, 2, dim, seqlen) in x's dtype, a view of channel-contiguous memory;
    computed in fp32. Inputs may be non-contiguous views (the mixer passes a transposed slice of in_proj's output).
    """
    _check_conv_inputs(x, weight, bias)
    if x.numel() == 0:  # nothing to launch
        return bidirectional_conv_silu_ref(x, weight, bias)
    if plain_eager(x):  # past the custom op's dispatch (vim.kernels.eager)
        fn = _EagerConv.apply if _needs_grad(x, weight, bias) else _conv_fwd
        return direct_call('vim::triton_bidirectional_conv_silu', fn, x, weight, bias)
    return _conv_op(x, weight, bias)
