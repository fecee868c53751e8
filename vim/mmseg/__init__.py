"""Vim in mmseg 1.x: ``custom_imports=dict(imports=['vim.mmseg'], allow_failed_imports=False)`` registers

* ``VisionMambaSeg`` (backbone) in mmseg's MODELS (use mmseg's own ``Feature2Pyramid`` as the neck);
* ``VimLayerDecayOptimizerConstructor`` in mmengine's root OPTIM_WRAPPER_CONSTRUCTORS (through :mod:`vim.mm`).
"""
from vim.mm import VimLayerDecayOptimizerConstructor

from .backbone import VisionMambaSeg

__all__ = ['VisionMambaSeg', 'VimLayerDecayOptimizerConstructor']
