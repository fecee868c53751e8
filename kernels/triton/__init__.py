"""Triton kernels of Vim's mixer: the fused bidirectional selective scan, forward (fwd.py) and backward (bwd.py), the
causal depthwise conv + silu of both branches (conv.py), and the torch custom ops over them (op.py). Runs on CUDA, or
on CPU tensors under TRITON_INTERPRET=1."""
from .op import DEFAULT_CHUNK, bidirectional_conv_silu_triton, bidirectional_scan_triton, check_device

__all__ = ['bidirectional_scan_triton', 'bidirectional_conv_silu_triton', 'check_device', 'DEFAULT_CHUNK']
