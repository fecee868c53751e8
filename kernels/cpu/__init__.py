"""Fused CPU kernels of Vim's mixer: the bidirectional selective scan (forward and backward) and the two-branch causal
conv + silu, written in C++ with ATen's SIMD vectors (csrc/), compiled on first use (build.py) and run as torch custom
ops (op.py). ``cpu_backend_status()`` says whether they can run here; ``auto`` falls back to the reference if not."""
from .build import cpu_backend_status
from .op import DEFAULT_CHUNK, bidirectional_conv_silu_cpu, bidirectional_scan_cpu

__all__ = ['bidirectional_scan_cpu', 'bidirectional_conv_silu_cpu', 'cpu_backend_status', 'DEFAULT_CHUNK']
