"""What the mmdet and mmseg adapters share; needs only mmengine.

Importing it registers :class:`VimLayerDecayOptimizerConstructor` in mmengine's root registry. The backbones
themselves are registered by :mod:`vim.mmdet` and :mod:`vim.mmseg`.
"""
from .backbone import ARCH_SETTINGS, VimBackbone
from .compat import trusted_mmengine_checkpoints
from .layer_decay import VimLayerDecayOptimizerConstructor, get_layer_id
from .pretrained import load_backbone_weights, resolve_checkpoint

__all__ = [
    'ARCH_SETTINGS', 'VimBackbone', 'VimLayerDecayOptimizerConstructor', 'get_layer_id', 'load_backbone_weights',
    'resolve_checkpoint', 'trusted_mmengine_checkpoints',
]
