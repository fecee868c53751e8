"""Public ops of Vim's mixer with backend dispatch. Models call only these.

Backends: ``reference`` (plain PyTorch, any device; the specification) and ``triton`` (:mod:`vim.kernels.triton`:
CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; ``bidirectional_scan`` and ``bidirectional_conv_silu``).
``cpu`` (:mod:`vim.kernels.cpu`: fused C++ kernels for CPU tensors, compiled on first use). ``auto`` picks ``triton``
for CUDA tensors when triton is installed, ``cpu`` for CPU tensors when its kernels build (else ``reference``, with
one warning). The environment variable
``VIM_SCAN_BACKEND`` overrides ``auto`` process-wide; an explicit ``backend=`` argument overrides both.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

from .cpu import bidirectional_conv_silu_cpu, bidirectional_scan_cpu, cpu_backend_status
from .cpu.build import load_extension, warn_fallback_once
from .reference import bidirectional_conv_silu_ref, bidirectional_scan_ref, selective_scan_ref

__all__ = ['selective_scan', 'bidirectional_scan', 'bidirectional_conv_silu', 'available_backends',
           'resolve_backend']

ENV_VAR = 'VIM_SCAN_BACKEND'
# Looked up once: a module-level constant keeps resolve_backend traceable by torch.compile.
TRITON_INSTALLED = importlib.util.find_spec('triton') is not None


def _bidirectional_scan_triton(*args, **kwargs) -> torch.Tensor:
    # imported on first use: triton is an optional dependency, and importing it costs time on CPU-only machines
    from .triton import bidirectional_scan_triton

    return bidirectional_scan_triton(*args, **kwargs)


def _bidirectional_conv_silu_triton(*args, **kwargs) -> torch.Tensor:
    from .triton import bidirectional_conv_silu_triton

    return bidirectional_conv_silu_triton(*args, **kwargs)


_SELECTIVE: dict[str, Callable] = {'reference': selective_scan_ref}
_BIDIRECTIONAL: dict[str, Callable] = {'reference': bidirectional_scan_ref, 'triton': _bidirectional_scan_triton}
_CONV: dict[str, Callable] = {'reference': bidirectional_conv_silu_ref, 'triton': _bidirectional_conv_silu_triton}

# ---- backend 'cpu' (kernels/cpu: fused C++ kernels, compiled on first use) ----
_BIDIRECTIONAL['cpu'] = bidirectional_scan_cpu
_SELECTIVE['cpu'] = selective_scan_ref  # not fused: Vim's mixer runs only the bidirectional scan
_CONV['cpu'] = bidirectional_conv_silu_cpu


# evaluated once while tracing (assume_constant_result): no graph break, and no build inside a graph
@torch.compiler.assume_constant_result
def _cpu_kernels_built() -> bool:
    """Whether the CPU kernels run here, building them on the first call."""
    return cpu_backend_status()[0]


@torch.compiler.assume_constant_result
def _cpu_kernels_available() -> bool:
    """As _cpu_kernels_built, with one warning per process when auto cannot use them."""
    available = _cpu_kernels_built()
    if not available:
        warn_fallback_once()
    return available


def _auto_on_cpu() -> str:
    # an exported graph keeps the reference op, the one export_decompositions knows how to rewrite
    return 'cpu' if not torch.compiler.is_exporting() and _cpu_kernels_available() else 'reference'
# ---- end of backend 'cpu' ----


def available_backends() -> list[str]:
    """Names accepted by ``backend=`` besides ``auto``."""
    return sorted(set(_SELECTIVE) | set(_BIDIRECTIONAL) | set(_CONV))


def _check_triton(x: torch.Tensor) -> None:
    """Raise a clear error unless the triton backend can run on ``x``'s device."""
    if not TRITON_INSTALLED:
        raise RuntimeError("scan backend 'triton' needs the triton package: pip install 'vim-backbones[triton]'")
    from .triton import check_device

    check_device(x.device)


def resolve_backend(backend: str | None, x: torch.Tensor) -> str:
    """The backend that will run for tensor ``x``: explicit argument, else $VIM_SCAN_BACKEND, else auto.

    Raises ValueError for an unknown name and RuntimeError when the backend cannot run on ``x`` (``triton``:
    package missing, or CPU tensors without TRITON_INTERPRET=1).
    """
    name = backend or os.environ.get(ENV_VAR) or 'auto'
    if name == 'auto':
        if x.device.type == 'cpu':
            return _auto_on_cpu()
        return 'triton' if x.is_cuda and TRITON_INSTALLED else 'reference'
    if name not in available_backends():
        source = 'backend argument' if backend else f'${ENV_VAR}'
        choices = ', '.join(['auto', *available_backends()])
        raise ValueError(f'Unknown scan backend {name!r} ({source}); available: {choices}')
    if name == 'triton':
        _check_triton(x)
    if name == 'cpu':
        if x.device.type != 'cpu':
            raise RuntimeError(f"scan backend 'cpu' runs on CPU tensors, got {x.device}")
        if not _cpu_kernels_built():
            load_extension()  # raises with the reason
    return name


def _implementation(registry: dict[str, Callable], name: str, op: str) -> Callable:
    if name not in registry:
        raise ValueError(f'scan backend {name!r} has no {op}; use one of {sorted(registry)}')
    return registry[name]


def selective_scan(
        u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: torch.Tensor | None = None, z: torch.Tensor | None = None,
        delta_bias: torch.Tensor | None = None, delta_softplus: bool = False, *, backend: str | None = None,
) -> torch.Tensor:
    """Selective scan, first token to last. Shapes and semantics: :func:`vim.kernels.selective_scan_ref`."""
    fn = _implementation(_SELECTIVE, resolve_backend(backend, u), 'selective_scan')
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def bidirectional_scan(
        u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, delta_softplus: bool = True, *,
        backend: str | None = None,
) -> torch.Tensor:
    """Vim's fused bidirectional scan. Shapes and semantics: :func:`vim.kernels.bidirectional_scan_ref`."""
    fn = _implementation(_BIDIRECTIONAL, resolve_backend(backend, u), 'bidirectional_scan')
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def bidirectional_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                            backend: str | None = None) -> torch.Tensor:
    """Causal depthwise conv + silu of Vim's two branches. Shapes: :func:`vim.kernels.bidirectional_conv_silu_ref`."""
    fn = _implementation(_CONV, resolve_backend(backend, x), 'bidirectional_conv_silu')
    return fn(x, weight, bias)
