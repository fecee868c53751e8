"""Build-on-first-use of the C++ CPU kernels (csrc/), with torch.utils.cpp_extension.

Nothing is compiled at ``pip install``: the first process that needs the kernels compiles them (about half a minute
on two cores) into torch's extension cache ($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions); later
processes load the cached library in well under a second. The SIMD level comes from the running CPU as torch sees it
(``torch.backends.cpu.get_cpu_capability()``): ATen's vector headers choose their implementation from the
CPU_CAPABILITY macros, and without them the same code compiles to the scalar fallback, about 10x slower. The library
name carries the level, so machines sharing a home directory keep one build per level.
"""
from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

from ..notice import announce_if_slow

__all__ = ['load_extension', 'cpu_backend_status', 'SOURCES']

CSRC = Path(__file__).resolve().parent / 'csrc'
SOURCES = (CSRC / 'scan.cpp', CSRC / 'conv.cpp')
# compiler flags and macros per ATen CPU capability (those torch builds its own kernels with)
_CAPABILITY_FLAGS = {
    'AVX512': ['-mavx512f', '-mavx512bw', '-mavx512vl', '-mavx512dq', '-mfma'],
    'AVX2': ['-mavx2', '-mfma', '-mf16c'],
    'DEFAULT': [],
}

# the first build takes ~30 s on two cores: past this many seconds it says so (kernels/notice.py)
SLOW_BUILD_NOTICE_S = 5.0
_lock = threading.Lock()
_result: tuple[ModuleType | None, str] | None = None


def _capability() -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in _CAPABILITY_FLAGS else 'DEFAULT'


def _build() -> ModuleType:
    # Importing cpp_extension on a CUDA build of torch without a GPU logs "No CUDA runtime is found" once; these
    # kernels are CPU-only, so that line would only confuse (e.g. `make features` on a laptop).
    cpp_logger = logging.getLogger('torch.utils.cpp_extension')
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        cpp_logger.setLevel(level)

    capability = _capability()
    macros = [] if capability == 'DEFAULT' else [f'-DCPU_CAPABILITY={capability}', f'-DCPU_CAPABILITY_{capability}']
    # -fopenmp: at::parallel_for is inline OpenMP; libgomp.so.1 resolves to the copy torch already loaded, so the
    # kernels share torch's thread pool and honour torch.set_num_threads.
    return load(name=f'vim_cpu_kernels_{capability.lower()}', sources=[str(s) for s in SOURCES],
                extra_cflags=['-O3', '-fopenmp', *macros, *_CAPABILITY_FLAGS[capability]],
                extra_ldflags=['-fopenmp'], verbose=os.environ.get('VIM_CPU_BUILD_VERBOSE') == '1')


def _load() -> tuple[ModuleType | None, str]:
    global _result
    with _lock:
        if _result is None:
            try:
                with announce_if_slow('compiling the C++ CPU kernels (the first use on this machine, about half a '
                                      'minute; cached for later processes)', SLOW_BUILD_NOTICE_S):
                    module = _build()
                _result = (module, f'C++ kernels built for {module.capability()}')
            except Exception as e:  # no compiler, unsupported CPU, unwritable cache: the reference remains
                reason = f'{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}'
                _result = (None, f'could not build the CPU kernels ({reason})')
        return _result


def load_extension() -> ModuleType:
    """The compiled kernels module (built on first call). Raises RuntimeError with the reason if it cannot build."""
    module, reason = _load()
    if module is None:
        raise RuntimeError(f"scan backend 'cpu': {reason}; a C++ compiler (g++ or clang++) and ninja are needed, "
                           f"or use backend='reference'")
    return module


def cpu_backend_status() -> tuple[bool, str]:
    """(available, reason): whether the CPU kernels can run in this process, building them on the first call."""
    module, reason = _load()
    return module is not None, reason


_warned = False


def warn_fallback_once() -> None:
    """One warning per process that ``auto`` runs the reference on CPU because the kernels did not build."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"vim: {_load()[1]}; backend 'auto' uses the (slower) reference scan on CPU", RuntimeWarning,
                      stacklevel=3)
