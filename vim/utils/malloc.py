"""Let glibc's malloc keep freed memory for reuse: CPU inference on large inputs without a page fault per 4 KiB.

PyTorch's CPU allocator takes every tensor from malloc. glibc serves a block above its mmap threshold (128 KiB at
start, adapting to at most 32 MiB) with fresh pages and returns them on free, and it gives its heap's free top back to
the system once that passes twice the threshold. A network whose layers each allocate and free tens of MiB (Vim-Ti
or DeiT-Ti at 1024², batch 1: ~40 MiB per Vim layer) then writes most of its activations into new pages that the
kernel must fault in and zero: about 2 us per page on the 2-core VM of benchmarks/, where keeping freed memory made
Vim-Ti's forward at 1024² 4-6% faster (benchmarks/README.md, 2026-11-26, third pass). PyTorch's CPU performance guide
suggests jemalloc or tcmalloc through LD_PRELOAD for the same reason; this is the in-process equivalent on glibc.

It changes the whole process's allocator (the memory it keeps is reused by any later allocation), so the engines that
own their process call it on CPU (feature extraction, the benchmark) and a library user opts in.
"""
from __future__ import annotations

import ctypes
import platform

__all__ = ['retain_freed_memory']

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(max_block_mib: int = 64, keep_mib: int = 1024) -> bool:
    """Serve blocks up to ``max_block_mib`` from the heap and keep up to ``keep_mib`` of freed heap for reuse.

    Returns True when applied (Linux with glibc), False elsewhere (other C libraries keep their own policy). Setting
    either value also turns off glibc's adaptive threshold, so both are set together.
    """
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, max_block_mib << 20)
                and libc.mallopt(_M_TRIM_THRESHOLD, keep_mib << 20))
