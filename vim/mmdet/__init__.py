"""Vim in mmdet 3.x: ``custom_imports=dict(imports=['vim.mmdet'], allow_failed_imports=False)`` registers

* ``VisionMambaDet`` (backbone) and ``SimpleFeaturePyramid`` (neck) and ``LayerNorm2d`` (norm) in mmdet's MODELS;
* ``VimLayerDecayOptimizerConstructor`` in mmengine's root OPTIM_WRAPPER_CONSTRUCTORS (through :mod:`vim.mm`).
"""
from vim.mm import VimLayerDecayOptimizerConstructor

from .backbone import VisionMambaDet
from .neck import LayerNorm2d, SimpleFeaturePyramid

__all__ = ['VisionMambaDet', 'SimpleFeaturePyramid', 'LayerNorm2d', 'VimLayerDecayOptimizerConstructor']
