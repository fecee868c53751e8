from .compile import add_compile_arguments, maybe_compile
from .environ import environ_set
from .files import PARTIAL, atomic_write
from .malloc import retain_freed_memory

__all__ = ['PARTIAL', 'add_compile_arguments', 'atomic_write', 'environ_set', 'maybe_compile', 'retain_freed_memory']
