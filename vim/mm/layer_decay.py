"""Layer-wise learning-rate decay for Vim backbones (the official segmentation recipe uses 0.92 over 24 blocks).

mmseg's ``LearningRateDecayOptimizerConstructor`` would read our parameter names, but it dispatches on the backbone
class name (``BEiT``/``MAE`` only) and decides "no weight decay" on un-prefixed names, so ``backbone.pos_embed``
and ``backbone.cls_token`` would be decayed. This constructor is registered in mmengine's root registry, so that
both mmdet and mmseg configs find it:

.. code-block:: python

    optim_wrapper = dict(
        optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05),
        constructor='VimLayerDecayOptimizerConstructor',
        paramwise_cfg=dict(decay_rate=0.92))

Layer ids (``num_layers`` = number of blocks, read from ``model.backbone.layers`` unless given):
``backbone.patch_embed``, ``backbone.pos_embed``, ``backbone.cls_token`` -> 0; ``backbone.layers.{i}`` -> i + 1;
the rest of the backbone (the final norm) -> num_layers, with the last block; everything outside the backbone
(neck, heads) -> num_layers + 1. The learning rate of id ``k`` is ``lr * decay_rate ** (num_layers + 1 - k)``.

Weight decay is 0 for 1-D parameters, biases, and the backbone's ``no_weight_decay()`` names (pos_embed,
cls_token, the mixers' D, conv and dt biases).
"""
from __future__ import annotations

import fnmatch
import re

import torch.nn as nn
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

__all__ = ['VimLayerDecayOptimizerConstructor', 'get_layer_id']

_EMBEDDINGS = ('backbone.patch_embed.', 'backbone.pos_embed', 'backbone.cls_token')


def get_layer_id(name: str, num_layers: int) -> int:
    """Layer id of the parameter ``name`` of a detector or segmentor with a Vim backbone (see the module doc)."""
    if name.startswith(_EMBEDDINGS):
        return 0
    m = re.match(r'backbone\.layers\.(\d+)\.', name)
    if m:
        return int(m.group(1)) + 1
    if name.startswith('backbone.'):
        return num_layers
    return num_layers + 1


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class VimLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Parameter groups with layer-wise decayed learning rates; ``paramwise_cfg``: ``decay_rate`` (required) and
    ``num_layers`` (optional). Other paramwise options of the default constructor are not supported."""

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None) -> None:
        paramwise_cfg = dict(paramwise_cfg or {})
        unknown = set(paramwise_cfg) - {'decay_rate', 'num_layers'}
        if 'decay_rate' not in paramwise_cfg or unknown:
            raise KeyError(f'paramwise_cfg takes decay_rate (required) and num_layers, got {sorted(paramwise_cfg)}')
        super().__init__(optim_wrapper_cfg, paramwise_cfg)

    def add_params(self, params: list[dict], module: nn.Module, **kwargs) -> None:
        backbone = module.backbone
        num_layers = self.paramwise_cfg.get('num_layers') or len(backbone.layers)
        decay_rate = self.paramwise_cfg['decay_rate']
        no_decay_patterns = [f'backbone.{p}' for p in getattr(backbone, 'no_weight_decay', set)()]
        groups: dict = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            no_decay = (param.ndim <= 1 or name.endswith('.bias')
                        or any(fnmatch.fnmatchcase(name, p) for p in no_decay_patterns))
            layer_id = get_layer_id(name, num_layers)
            key = f'layer_{layer_id}_{"no_decay" if no_decay else "decay"}'
            if key not in groups:
                scale = decay_rate ** (num_layers + 1 - layer_id)
                groups[key] = dict(params=[], param_names=[], group_name=key, lr_scale=scale,
                                   lr=self.base_lr * scale, weight_decay=0.0 if no_decay else self.base_wd)
            groups[key]['params'].append(param)
            groups[key]['param_names'].append(name)
        print_log(f'VimLayerDecayOptimizerConstructor: {len(groups)} groups, decay_rate {decay_rate} over '
                  f'{num_layers} blocks', logger='current')
        params.extend(groups[k] for k in sorted(groups, key=lambda k: (int(k.split('_')[1]), k)))
