"""Direct calls of the fused kernels in plain eager mode, past their torch custom ops.

A custom op's dispatch is Python on every call: the autograd wrapper, the redispatch, the backend wrapper with its
alias check, and in the backward the defaults filled in again. The CPU and Triton backends therefore call their
kernels directly (through an ``autograd.Function`` when a gradient is needed) where nothing can observe the
difference, and keep the ops for everything else.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ['plain_eager', 'direct_call']


def plain_eager(x: torch.Tensor) -> bool:
    """Whether a call may run the kernels directly rather than through their custom op.

    Only for plain tensors in eager mode with no Python dispatch mode active: torch.compile / torch.export tracing,
    FakeTensors, tensor subclasses and modes such as FlopCounterMode still see the op. Under torch.profiler a direct
    call is recorded under the op's name (:func:`direct_call`). The mixer's eager-only x_proj padding
    (vim.layers.mixer.ssm_projections) asks the same question.
    """
    return type(x) is torch.Tensor and not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0


def direct_call(name: str, fn: Callable, *args):
    """fn(*args), as a profiler range named like the custom op ``name`` while torch.profiler runs."""
    if torch._C._autograd._profiler_enabled():
        with torch.profiler.record_function(name):
            return fn(*args)
    return fn(*args)
