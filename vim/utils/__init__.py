from .environ import environ_set
from .files import PARTIAL, atomic_write
from .malloc import retain_freed_memory

__all__ = ['PARTIAL', 'atomic_write', 'environ_set', 'retain_freed_memory']
