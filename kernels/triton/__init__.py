"""Triton kernels of the selective scans: the fused bidirectional scan, forward (fwd.py) and backward (bwd.py)
kernels, and the autograd op over them (op.py). Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1."""
from .op import DEFAULT_CHUNK, bidirectional_scan_triton, check_device

__all__ = ['bidirectional_scan_triton', 'check_device', 'DEFAULT_CHUNK']
