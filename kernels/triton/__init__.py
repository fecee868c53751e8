"""Triton kernels of Vim's mixer: the fused bidirectional selective scan, forward (fwd.py, with pack.py) and backward
(bwd.py), the causal depthwise conv + silu of both branches (conv.py), and the torch custom ops over them (op.py).
Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1. report.py predicts their speed from their compiled code.

``AUTOTUNED_KERNELS``: every autotuned kernel the ops launch (pinning one config: set its ``.configs = [config]``),
``SCAN_KERNELS`` then ``CONV_KERNELS``;
``CONFIGS``: kernel function name -> every config it autotunes over on a GPU (the interpreter keeps only the first).
"""
from . import bwd, conv, fwd
from .common import all_configs
from .op import DEFAULT_CHUNK, bidirectional_conv_silu_triton, bidirectional_scan_triton, check_device

SCAN_KERNELS = (fwd._segment_state_kernel, fwd._segment_boundary_kernel, fwd._scan_output_kernel,
                bwd._segment_carry_kernel, bwd._bidirectional_scan_bwd_kernel)
CONV_KERNELS = (conv._bidirectional_conv_fwd_kernel, conv._bidirectional_conv_bwd_kernel)
AUTOTUNED_KERNELS = SCAN_KERNELS + CONV_KERNELS
CONFIGS = {kernel.fn.__name__: all_configs(candidates) for kernel, candidates in zip(AUTOTUNED_KERNELS, (
    fwd._STATE_CONFIGS, fwd._BOUNDARY_CONFIGS, fwd._OUTPUT_CONFIGS, bwd._CARRY_CONFIGS, bwd._CONFIGS,
    conv._FWD_CONFIGS, conv._BWD_CONFIGS))}

__all__ = ['bidirectional_scan_triton', 'bidirectional_conv_silu_triton', 'check_device', 'DEFAULT_CHUNK',
           'AUTOTUNED_KERNELS', 'SCAN_KERNELS', 'CONV_KERNELS', 'CONFIGS']
