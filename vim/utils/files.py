"""Atomic file writes shared by the tools: readers see the old file or the whole new one, never a partial one."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ['PARTIAL', 'atomic_write']

# marks temporary files, so that a tool can remove the ones a killed run left behind
PARTIAL = '.partial-'


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: bytes | Callable[[Path], None]) -> None:
    """Write ``data`` (bytes, or a function writing a given temporary path) beside ``path``, flush it to disk and
    rename it over ``path``. The temporary file ``.<name>.partial-<pid>`` is removed if anything fails."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}{PARTIAL}{os.getpid()}')
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            tmp.write_bytes(data)
        else:
            data(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # some writers (tempfile, safetensors) create private files
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
