"""``--torchcompile [BACKEND]`` and ``--torchcompile-mode``, as timm's train.py, validate.py and benchmark.py take them.

torch.compile itself refuses an unknown backend or mode with its own error when the module is wrapped; the Vim
mixer's ops are custom ops with fake implementations, so a compiled Vim model is one graph (no break) on every scan
backend.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

__all__ = ['add_compile_arguments', 'maybe_compile']


def _backend_name(text: str) -> str:
    """A registered torch.compile backend, or an error that says how a positional argument got taken for one."""
    known = torch._dynamo.list_backends(exclude_tags=())
    if text not in known:
        raise argparse.ArgumentTypeError(
            f'{text!r} is not a torch.compile backend ({", ".join(sorted(known))}). Without a backend name, '
            f'--torchcompile takes the next word as one: write --torchcompile=inductor or put it after the inputs')
    return text


def add_compile_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument('--torchcompile', nargs='?', const='inductor', default=None, metavar='BACKEND', type=_backend_name,
                   help='torch.compile the model with this backend (no value: inductor)')
    p.add_argument('--torchcompile-mode', default=None, metavar='MODE',
                   help="torch.compile's mode (default, reduce-overhead, max-autotune, ...); needs --torchcompile")


def maybe_compile(fn: Callable, backend: str | None, mode: str | None = None, *,
                  device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Callable:
    """``torch.compile(fn, backend=backend, mode=mode)``, or ``fn`` itself when ``backend`` is None.

    ``device``, ``dtype``: where and in which dtype the scans will run (the autocast dtype, else fp32); None for a
    model without Vim mixers (``vim.layers.uses_scan``). The scan backend is settled there first
    (``vim.kernels.warmup``: on CUDA 'auto''s self-check for that device and dtype), because torch.compile traces
    before the first eager call, and 'auto' would otherwise have to choose during tracing, where it takes the
    reference (exact, slow) with a warning. A compiled module shares the module's parameters; save and load the
    module, not the wrapper (its state dict's keys carry an ``_orig_mod.`` prefix).
    """
    if not backend:
        if mode:
            raise ValueError(f'--torchcompile-mode {mode} needs --torchcompile')
        return fn
    if device is not None:
        from vim.kernels import warmup
        warmup(device, dtype or torch.float32)
    return torch.compile(fn, backend=backend, mode=mode)
