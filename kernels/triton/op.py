"""The fused bidirectional selective scan as an autograd op: input guard, ``autograd.Function``, public function.

Semantics, shapes and dtype policy are those of :func:`vim.kernels.bidirectional_scan_ref`: inputs in the
activation dtype (fp32, bf16 or fp16; A, D and delta_bias usually fp32), every load upcast to fp32, all arithmetic
and accumulation in fp32, the output in u's dtype and each gradient in its input's dtype.
"""
from __future__ import annotations

import contextlib

import torch

from .bwd import scan_bwd
from .common import INTERPRET
from .fwd import scan_fwd

__all__ = ['bidirectional_scan_triton', 'check_device', 'DEFAULT_CHUNK']

# Tokens per chunk: the length of the scanned tile, and the spacing of the states saved for the backward pass.
DEFAULT_CHUNK = 32
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


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    """Shapes, dtypes and devices, checked once at the autograd boundary instead of inside each kernel launcher."""
    named = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f'{name} must be a tensor, got {type(t).__name__}')
        if t.dtype not in _DTYPES:
            raise TypeError(f'{name}: the Triton scan takes fp32, bf16 or fp16, got {t.dtype}')
        if t.device != u.device:
            raise ValueError(f'{name} is on {t.device}, u on {u.device}')
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
    if max(dim, dstate) * seqlen >= 2**31:  # in-kernel offsets within one (batch, direction) slab are int32
        raise ValueError(f'dim * seqlen and dstate * seqlen must stay below 2**31, got {tuple(u.shape)}, {dstate}')
    check_device(u.device)


def _device_context(device: torch.device):
    """Launch on the inputs' GPU, not the current one (fla's input_guard does the same)."""
    return torch.cuda.device(device) if device.type == 'cuda' else contextlib.nullcontext()


class BidirectionalScanFn(torch.autograd.Function):
    """Saves the inputs as given (strided views are read in place, never copied) and the chunk-boundary states."""

    @staticmethod
    @torch.amp.custom_fwd(device_type='cuda')
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, chunk: int):
        with _device_context(u.device):
            out, states = scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, store_states=True)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.delta_softplus = delta_softplus
        ctx.chunk = chunk
        return out.to(u.dtype)

    @staticmethod
    @torch.amp.custom_bwd(device_type='cuda')
    def backward(ctx, gout):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        with _device_context(u.device):
            grads = scan_bwd(gout, u, delta, A, B, C, D, z, delta_bias, states, ctx.delta_softplus, ctx.chunk)
        return (*grads, None, None)


def bidirectional_scan_triton(
        u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, delta_softplus: bool = True, *,
        chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Vim's bidirectional scan, both directions and the gate fused into one Triton op.

    Same arguments and result as :func:`vim.kernels.bidirectional_scan_ref`: u, delta (batch, 2, dim, seqlen),
    A (2, dim, dstate), B, C (batch, 2, dstate, seqlen), D, delta_bias (2, dim), z (batch, dim, seqlen) ->
    (batch, dim, seqlen) in u's dtype. Inputs may be non-contiguous views. ``chunk_size`` (a power of two) is the
    scan tile length and the spacing of the saved states; tests shrink it to cover several chunks cheaply.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if chunk_size < 2 or chunk_size & (chunk_size - 1):
        raise ValueError(f'chunk_size must be a power of two >= 2, got {chunk_size}')
    if u.numel() == 0:  # nothing to launch; keep the (empty) result attached to the graph
        return (u.sum(1) + z).to(u.dtype)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return BidirectionalScanFn.apply(*inputs, bool(delta_softplus), int(chunk_size))
    # inference: no autograd node, and no chunk states written
    with _device_context(u.device):
        out, _ = scan_fwd(*inputs, bool(delta_softplus), int(chunk_size), store_states=False)
    return out.to(u.dtype)
