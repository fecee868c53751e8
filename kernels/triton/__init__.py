"""Triton kernels of Vim's mixer: the fused bidirectional selective scan, forward (fwd.py) and backward (bwd.py), the
causal depthwise conv + silu of both branches (conv.py), and the torch custom ops over them (op.py). Runs on CUDA, or
on CPU tensors under TRITON_INTERPRET=1."""
from .bwd import _bidirectional_scan_bwd_kernel
from .conv import _bidirectional_conv_bwd_kernel, _bidirectional_conv_fwd_kernel
from .fwd import _bidirectional_scan_fwd_kernel
from .op import DEFAULT_CHUNK, bidirectional_conv_silu_triton, bidirectional_scan_triton, check_device

# Every @triton.autotune kernel the ops above launch. The dispatcher's self-check (vim.kernels.selfcheck) pins each
# of their configs in turn (``kernel.configs = [config]``) and checks it against the reference; keep this complete.
AUTOTUNED_KERNELS = (_bidirectional_scan_fwd_kernel, _bidirectional_scan_bwd_kernel, _bidirectional_conv_fwd_kernel,
                     _bidirectional_conv_bwd_kernel)

__all__ = ['bidirectional_scan_triton', 'bidirectional_conv_silu_triton', 'check_device', 'DEFAULT_CHUNK',
           'AUTOTUNED_KERNELS']
