"""retain_freed_memory: a freed large block stays in the process heap for reuse (glibc), which it does not by
default. Each case runs in a fresh interpreter: the setting is process-wide and cannot be undone."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc',
                                reason='glibc only')

# Allocates and frees a 48 MiB tensor (above glibc's largest adaptive mmap threshold, 32 MiB), then prints the free
# bytes the heap holds (mallinfo2's fordblks, glibc >= 2.33).
_PROBE = '''
import ctypes, sys
import torch
from vim.utils import retain_freed_memory
if sys.argv[1] == 'retain':
    assert retain_freed_memory() is True
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks',
                 'keepcost')]
libc = ctypes.CDLL(None)
if not hasattr(libc, 'mallinfo2'):
    print('no-mallinfo2'); sys.exit(0)
libc.mallinfo2.restype = MallInfo2
x = torch.ones(12 << 20)  # 48 MiB of fp32
del x
print(libc.mallinfo2().fordblks)
'''


def _free_heap_bytes(mode: str) -> int:
    out = subprocess.run([sys.executable, '-c', _PROBE, mode], capture_output=True, text=True, check=True).stdout
    if out.strip() == 'no-mallinfo2':
        pytest.skip('glibc without mallinfo2')
    return int(out.strip().splitlines()[-1])


def test_freed_block_is_kept_for_reuse():
    assert _free_heap_bytes('retain') >= 48 << 20


def test_default_returns_it():  # what the setting changes: glibc's default gives the block back to the system
    assert _free_heap_bytes('default') < 48 << 20
