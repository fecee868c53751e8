"""What the mmdet and mmseg adapters share: the backbone base class, ImageNet weights, layer-wise lr decay, the
``vim-train-mm`` / ``vim-test-mm`` commands (:mod:`vim.mm.cli`) and the config rewrites behind their options
(:mod:`vim.mm.config`).

Its names are imported on first use (PEP 562), so that ``import vim.mm.cli`` and the commands' ``--help`` work
without the OpenMMLab stack. ``VimLayerDecayOptimizerConstructor`` is registered in mmengine's root registry when
:mod:`vim.mm.layer_decay` is imported, which :mod:`vim.mmdet` and :mod:`vim.mmseg` (the configs'
``custom_imports``) do, together with their backbones.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    'ARCH_SETTINGS': 'backbone',
    'VimBackbone': 'backbone',
    'trusted_mmengine_checkpoints': 'compat',
    'VimLayerDecayOptimizerConstructor': 'layer_decay',
    'get_layer_id': 'layer_decay',
    'load_backbone_weights': 'pretrained',
    'resolve_checkpoint': 'pretrained',
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f'.{_EXPORTS[name]}', __name__), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
