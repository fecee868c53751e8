"""The official CUDA kernels as a backend: mamba_ssm's ``selective_scan_fn`` and causal_conv1d's ``causal_conv1d_fn``.

Optional (``pip install 'vim-backbones[mamba]'``, CUDA only). Both directions run as the official Vim model runs them
(``mamba_simple.Mamba.forward`` with ``bimamba_type='v2'``): the forward direction on the sequence, the backward
direction on the flipped sequence with its own A, D, dt bias and conv parameters and the flipped gate z, its output
flipped back. The average of the two directions is taken in fp32 as :func:`vim.kernels.bidirectional_scan_ref` does.
"""
from __future__ import annotations

import importlib
import importlib.util

import torch

__all__ = ['bidirectional_scan_mamba', 'bidirectional_conv_silu_mamba', 'selective_scan_mamba',
           'mamba_ssm_installed', 'INSTALL_HINT']

INSTALL_HINT = "pip install 'vim-backbones[mamba]' (builds mamba_ssm and causal_conv1d for your torch and CUDA)"


def mamba_ssm_installed() -> bool:
    """Whether the ``mamba_ssm`` package can be found, without importing it (importing builds CUDA state)."""
    try:
        return importlib.util.find_spec('mamba_ssm') is not None
    except ValueError:  # a module in sys.modules without a spec (tests inject one)
        return True


def _import(module: str, name: str, package: str):
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise RuntimeError(f"scan backend 'mamba_ssm' needs the {package} package ({e}): {INSTALL_HINT}") from e


def _selective_scan_fn():
    return _import('mamba_ssm.ops.selective_scan_interface', 'selective_scan_fn', 'mamba_ssm')


def _causal_conv1d_fn():
    return _import('causal_conv1d', 'causal_conv1d_fn', 'causal_conv1d')


def selective_scan_mamba(
        u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: torch.Tensor | None = None, z: torch.Tensor | None = None,
        delta_bias: torch.Tensor | None = None, delta_softplus: bool = False, return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """mamba_ssm's ``selective_scan_fn`` as it is. Shapes: :func:`vim.kernels.selective_scan_ref`."""
    return _selective_scan_fn()(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _direction(selective_scan_fn, k: int, reverse: bool, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Direction ``k`` of Vim's scan through ``selective_scan_fn``; ``reverse`` scans the flipped sequence and flips
    the result back. Activations are cast to u's dtype and A, D, dt bias to fp32, the dtypes the kernel accepts
    (no-ops for the tensors the mixer passes)."""
    def seq(t: torch.Tensor) -> torch.Tensor:
        t = t.to(u.dtype)
        return t.flip(-1) if reverse else t

    f32 = torch.float32
    y = selective_scan_fn(seq(u[:, k]), seq(delta[:, k]), A[k].to(f32), seq(B[:, k]), seq(C[:, k]), D[k].to(f32),
                          z=seq(z), delta_bias=delta_bias[k].to(f32), delta_softplus=delta_softplus)
    return y.flip(-1) if reverse else y


def bidirectional_scan_mamba(
        u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, delta_softplus: bool = True,
) -> torch.Tensor:
    """Vim's bidirectional scan through mamba_ssm's kernel, one call per direction.

    Same arguments and result as :func:`vim.kernels.bidirectional_scan_ref`: u, delta (batch, 2, dim, seqlen),
    A (2, dim, dstate), B, C (batch, 2, dstate, seqlen), D, delta_bias (2, dim), z (batch, dim, seqlen) ->
    (batch, dim, seqlen) in u's dtype.
    """
    fn = _selective_scan_fn()
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    y_forward = _direction(fn, 0, False, *args)
    y_backward = _direction(fn, 1, True, *args)
    return ((y_forward.float() + y_backward.float()) * 0.5).to(u.dtype)


def bidirectional_conv_silu_mamba(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Vim's two-branch causal conv + silu through causal_conv1d's kernel, one call per branch.

    Same arguments and result as :func:`vim.kernels.bidirectional_conv_silu_ref`: x (batch, dim, seqlen), weight
    (2, dim, width) with 2 <= width <= 4 (causal_conv1d's range), bias (2, dim) -> (batch, 2, dim, seqlen) in x's
    dtype; branch 1 convolves the flipped sequence and is flipped back.
    """
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[:2] != (2, x.shape[1]) or tuple(bias.shape) != (2, x.shape[1]):
        raise ValueError(f'expected x (batch, dim, seqlen), weight (2, dim, width), bias (2, dim); got '
                         f'{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(bias.shape)}')
    if not 2 <= weight.shape[2] <= 4:
        raise ValueError(f"scan backend 'mamba_ssm': causal_conv1d supports conv widths 2 to 4, got "
                         f"{weight.shape[2]}; use backend='triton' or 'reference'")
    conv = _causal_conv1d_fn()
    x = x if x.stride(-1) == 1 else x.contiguous()  # the official model passes a (batch, dim, seqlen) slice of xz

    def branch(k: int, inputs: torch.Tensor) -> torch.Tensor:
        return conv(inputs, weight[k], bias[k].to(weight.dtype).contiguous(), activation='silu')

    return torch.stack([branch(0, x), branch(1, x.flip(-1)).flip(-1)], dim=1)
