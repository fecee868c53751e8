"""Running mmengine 0.10 on torch >= 2.6.

torch 2.6 made ``torch.load(weights_only=True)`` the default. mmengine 0.10 predates that: the checkpoints its Runner
writes hold the message hub (``HistoryBuffer`` objects pickled with bound methods) and numpy values, and its loaders
(``resume``, ``load_from``) call ``torch.load`` without ``weights_only``, so resuming fails. Allow-listing cannot
help (the bound methods pickle through ``builtins.getattr``), so :func:`trusted_mmengine_checkpoints` restores the
pre-2.6 default for the duration of a run. It affects only calls that do not pass ``weights_only``: Vim's own
ImageNet loader (:func:`vim.models.load_checkpoint_file`) passes ``weights_only=True`` and stays safe.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from vim.utils import environ_set

__all__ = ['trusted_mmengine_checkpoints']

_ENV = 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'


@contextlib.contextmanager
def trusted_mmengine_checkpoints() -> Iterator[None]:
    """Within the block, ``torch.load`` without ``weights_only`` unpickles fully (as before torch 2.6): use it around
    a Runner whose ``load_from`` / ``resume`` checkpoints you trust (your own work dirs, OpenMMLab's model zoo)."""
    with environ_set(_ENV, '1'):
        yield
