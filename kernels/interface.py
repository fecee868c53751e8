"""Public scan ops with backend dispatch. Models call only these.

Backends: ``reference`` (plain PyTorch, any device; the specification). ``auto`` picks the fastest backend
available for the inputs. The environment variable ``VIM_SCAN_BACKEND`` overrides ``auto`` process-wide; an
explicit ``backend=`` argument overrides both.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .reference import bidirectional_scan_ref, selective_scan_ref

__all__ = ['selective_scan', 'bidirectional_scan', 'available_backends', 'resolve_backend']

_SELECTIVE: dict[str, Callable] = {'reference': selective_scan_ref}
_BIDIRECTIONAL: dict[str, Callable] = {'reference': bidirectional_scan_ref}
ENV_VAR = 'VIM_SCAN_BACKEND'


def available_backends() -> list[str]:
    """Names accepted by ``backend=`` besides ``auto``."""
    return sorted(_SELECTIVE)


def resolve_backend(backend: str | None, x: torch.Tensor) -> str:
    """The backend that will run for tensor ``x``: explicit argument, else $VIM_SCAN_BACKEND, else auto."""
    name = backend or os.environ.get(ENV_VAR) or 'auto'
    if name == 'auto':
        return 'reference'
    if name not in _SELECTIVE:
        source = 'backend argument' if backend else f'${ENV_VAR}'
        choices = ', '.join(['auto', *available_backends()])
        raise ValueError(f'Unknown scan backend {name!r} ({source}); available: {choices}')
    return name


def selective_scan(
        u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: torch.Tensor | None = None, z: torch.Tensor | None = None,
        delta_bias: torch.Tensor | None = None, delta_softplus: bool = False, *, backend: str | None = None,
) -> torch.Tensor:
    """Selective scan, first token to last. Shapes and semantics: :func:`vim.kernels.selective_scan_ref`."""
    return _SELECTIVE[resolve_backend(backend, u)](u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def bidirectional_scan(
        u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, delta_softplus: bool = True, *,
        backend: str | None = None,
) -> torch.Tensor:
    """Vim's fused bidirectional scan. Shapes and semantics: :func:`vim.kernels.bidirectional_scan_ref`."""
    return _BIDIRECTIONAL[resolve_backend(backend, u)](u, delta, A, B, C, D, z, delta_bias, delta_softplus)
