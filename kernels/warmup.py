"""Prepare the scan ops on a device before torch.compile or CUDA-graph capture: :func:`warmup`."""
from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch

from .interface import bidirectional_conv_silu, bidirectional_scan, resolve_backend
from .selfcheck import CheckCase, case_inputs

__all__ = ['warmup', 'ScanShape']


class ScanShape(NamedTuple):
    """The sizes of one mixer call: ``dim`` is the mixer's inner width (d_inner: 384 for Vim-Ti, 768 for Vim-S),
    ``seqlen`` the tokens including class tokens (197 for Vim at 224^2 with patch 16)."""
    batch: int
    dim: int
    seqlen: int
    dstate: int = 16
    conv_width: int = 4


def warmup(device: torch.device | str = 'cuda', dtype: torch.dtype = torch.bfloat16,
           shapes: Iterable[ScanShape | tuple[int, ...]] = (), *, backward: bool = True,
           backend: str | None = None) -> str:
    """Prepare the scan ops on ``device`` in ``dtype``; returns the backend that will serve the scan (the conv's is
    the same unless the self-check failed on one op only: ``resolve_backend(None, x, op='conv')``).

    Resolves the backends as the ops will (``backend``, else $VIM_SCAN_BACKEND, else auto), which for ``auto`` runs
    the Triton self-check for (device, dtype) now if it has not run in this process; then runs the conv and the scan
    once for each shape in ``shapes`` (:class:`ScanShape` or a plain tuple in its order), forward and, with
    ``backward``, backward, so that Triton compiles and autotunes them now. Afterwards torch.compile tracing sees
    the check's result and CUDA-graph capture launches compiled, tuned kernels. Autotuning keys include the shapes:
    warm up with the batch sizes and token counts you will capture.

    Example::

        vim.kernels.warmup('cuda', torch.bfloat16, [(64, 384, 197)])  # Vim-Ti, batch 64, 224^2
        graph = torch.cuda.CUDAGraph()
    """
    device = torch.device(device)
    probe = torch.empty(0, device=device, dtype=dtype)
    name, conv_name = resolve_backend(backend, probe), resolve_backend(backend, probe, op='conv')
    for shape in shapes:
        s = ScanShape(*shape)
        case = CheckCase(s.batch, s.dim, s.dstate, s.seqlen, s.conv_width, layout='mixer')
        with torch.inference_mode(False), torch.set_grad_enabled(backward):
            scan_args, conv_args = case_inputs(case, dtype, device, seed=0)
            y = bidirectional_conv_silu(*conv_args, backend=conv_name)
            out = bidirectional_scan(*scan_args, delta_softplus=True, backend=name)
            if backward:
                torch.autograd.grad((y, out), [*scan_args, *conv_args], (torch.ones_like(y), torch.ones_like(out)))
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return name
