"""One-time work that can take minutes (compiling kernels on first use) says so instead of looking like a hang."""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

__all__ = ['announce_if_slow']

_logger = logging.getLogger('vim.kernels')


@contextlib.contextmanager
def announce_if_slow(what: str, after_s: float) -> Iterator[None]:
    """Log ``vim.kernels: {what}...`` (a warning: stderr through logging's last-resort handler when the application
    configured none) if the block is still running after ``after_s`` seconds, and how long it took when it ends;
    nothing for a quicker block."""
    notice = threading.Timer(after_s, _logger.warning, args=(f'vim.kernels: {what}...',))
    notice.daemon = True
    start = time.perf_counter()
    notice.start()
    try:
        yield
    finally:
        notice.cancel()
        elapsed = time.perf_counter() - start
        if elapsed >= after_s:
            _logger.warning(f'vim.kernels: done in {elapsed:.0f} s ({what.split(" (")[0]})')
