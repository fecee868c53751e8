from .environ import environ_set
from .files import PARTIAL, atomic_write

__all__ = ['PARTIAL', 'atomic_write', 'environ_set']
