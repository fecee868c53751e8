"""A process environment variable set for the duration of a block."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ['environ_set']


@contextlib.contextmanager
def environ_set(name: str, value: str) -> Iterator[None]:
    """Within the block ``os.environ[name] == value``; afterwards the previous value (or its absence) is restored."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous
