"""``--torchcompile [BACKEND]`` and ``--torchcompile-mode``, as timm's train.py, validate.py and benchmark.py take them.

torch.compile itself refuses an unknown backend or mode with its own error when the module is wrapped; the Vim
mixer's ops are custom ops with fake implementations, so a compiled Vim model is one graph (no break) on every scan
backend.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

__all__ = ['add_compile_arguments', 'maybe_compile']


def add_compile_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument('--torchcompile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                   help='torch.compile the model with this backend (no value: inductor)')
    p.add_argument('--torchcompile-mode', default=None, metavar='MODE',
                   help="torch.compile's mode (default, reduce-overhead, max-autotune, ...); needs --torchcompile")


def maybe_compile(module: nn.Module, backend: str | None, mode: str | None = None) -> nn.Module:
    """``torch.compile(module, backend=backend, mode=mode)``, or ``module`` itself when ``backend`` is None. The
    compiled wrapper shares the module's parameters; save and load the module, not the wrapper (its state dict's
    keys carry an ``_orig_mod.`` prefix)."""
    if not backend:
        if mode:
            raise ValueError(f'--torchcompile-mode {mode} needs --torchcompile')
        return module
    return torch.compile(module, backend=backend, mode=mode)
