"""The part of the mmdet and mmseg backbones that does not depend on either library: a :class:`VisionMamba` that is
also an mmengine ``BaseModule``, returns feature maps of chosen layers and takes ImageNet weights from ``init_cfg``.

It subclasses VisionMamba rather than wrapping it so that parameter names stay the model's own
(``backbone.layers.{i}``, ``backbone.patch_embed``, ``backbone.pos_embed``, ``backbone.cls_token``): official
and timm state dicts load without renaming and the layer-wise learning-rate decay reads block numbers from them.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import print_log
from mmengine.model import BaseModule

from vim.models import VisionMamba

from .pretrained import load_backbone_weights

__all__ = ['VimBackbone', 'ARCH_SETTINGS']

# The released widths; all have 24 blocks, patch 16, d_state 16 (hustvl/Vim).
ARCH_SETTINGS: dict[str, dict[str, int]] = {
    'tiny': dict(embed_dim=192, depth=24),
    'small': dict(embed_dim=384, depth=24),
    'base': dict(embed_dim=768, depth=24),
}
_ARCH_KEYS = ('embed_dim', 'depth', 'd_state', 'd_conv', 'expand', 'dt_rank')


class VimBackbone(VisionMamba, BaseModule):
    """Vision Mamba as a dense-prediction backbone: the residual stream after chosen blocks as feature maps.

    The position embedding is sized for ``img_size`` (the training resolution, to which pretrained weights are
    resampled around the middle class token) and resampled per input for other sizes, so test images need not be
    square. Both resamplings are plain bicubic (``align_corners=False``, no antialias): the official recipes' for
    the checkpoint, and mmseg's ViT / ViTDet's per input (timm's antialiased one is for timm's own models). The
    class token stays in the sequence (the pretrained model was trained with it) and is dropped from the
    outputs.

    Args:
        arch: 'tiny', 'small', 'base', or a dict of VisionMamba sizes (embed_dim, depth, d_state, d_conv, expand,
            dt_rank) for custom models.
        img_size: training resolution (int or (h, w)).
        patch_size: patch size. stride: patch stride (``patch_size`` by default; 8 for the finer models). When the
            stride is smaller than the patch, inputs are padded by ``(patch - stride) / 2`` per side so that the token
            grid is exactly ``H / stride x W / stride``, aligned with the other levels of the pyramid.
        out_indices: blocks whose outputs are returned (negative from the end).
        final_norm: apply the model's final RMSNorm to the returned features; without it the norm is removed.
        drop_path_rate: stochastic depth over the blocks. with_cp: gradient checkpointing per block.
        scan_recompute: each mixer runs its conv, projections and scan again in the backward instead of keeping
            their outputs (``VisionMamba.set_scan_recompute``): less training memory for one more forward scan
            a layer, a finer knob than ``with_cp``.
        autocast_dtype: run the backbone under ``torch.autocast`` in this dtype ('bfloat16' or 'float16') and
            return fp32 maps, so that mixed precision covers the backbone without reaching the heads (mmdet's RoI
            heads build anchors and boxes in the features' dtype and mmcv's NMS takes only fp32 boxes).
        init_cfg: ``dict(type='Pretrained', checkpoint=..., prefix=None)`` for ImageNet weights (see
            :func:`vim.mm.pretrained.resolve_checkpoint` for what ``checkpoint`` may be); anything else or None keeps
            the official random initialisation.
    """

    dynamic_pos_embed_antialias = False  # per-input resampling as mmseg's ViT and ViTDet do it

    def __init__(
            self,
            arch: str | dict[str, int] = 'tiny',
            img_size: int | tuple[int, int] = 512,
            patch_size: int = 16,
            stride: int | None = None,
            out_indices: Sequence[int] = (5, 11, 17, 23),
            final_norm: bool = False,
            drop_path_rate: float = 0.0,
            with_cp: bool = False,
            scan_recompute: bool = False,
            autocast_dtype: Literal['bfloat16', 'float16'] | None = None,
            init_cfg: dict | list[dict] | None = None,
    ) -> None:
        if autocast_dtype not in (None, 'bfloat16', 'float16'):
            raise ValueError(f"autocast_dtype must be None, 'bfloat16' or 'float16', got {autocast_dtype!r}")
        if isinstance(arch, str):
            if arch not in ARCH_SETTINGS:
                raise KeyError(f'arch must be one of {sorted(ARCH_SETTINGS)} or a dict, got {arch!r}')
            arch_args = dict(ARCH_SETTINGS[arch])
        else:
            arch_args = dict(arch)
            unknown = set(arch_args) - set(_ARCH_KEYS)
            if unknown:
                raise KeyError(f'unknown arch keys {sorted(unknown)}; allowed: {_ARCH_KEYS}')
        stride = stride or patch_size
        if (patch_size - stride) % 2:
            raise ValueError(f'patch_size - stride must be even to centre the patches, got {patch_size}, {stride}')
        grid_pad = (patch_size - stride) // 2
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        super().__init__(
            img_size=tuple(s + 2 * grid_pad for s in img_size), patch_size=patch_size, stride=stride,
            num_classes=0, global_pool='', drop_path_rate=drop_path_rate, dynamic_img_size=True,
            scan_recompute=scan_recompute, **arch_args)
        # VisionMamba.__init__ ran BaseModule.__init__ (init_cfg None) through super(); set ours now.
        self.init_cfg = copy.deepcopy(init_cfg)
        self.grid_pad = grid_pad
        depth = len(self.layers)
        indices = [i % depth for i in out_indices if -depth <= i < depth]
        if len(indices) != len(out_indices) or len(set(indices)) != len(indices):
            raise ValueError(f'out_indices {tuple(out_indices)} must be distinct blocks of a {depth}-block model')
        self.out_indices = tuple(sorted(indices))
        self.final_norm = final_norm
        if not final_norm:
            self.norm = nn.Identity()  # unused parameters would break DDP without find_unused_parameters
        self.set_grad_checkpointing(with_cp)
        self.autocast_dtype = autocast_dtype

    def init_weights(self) -> None:
        """Random init (also what VisionMamba's constructor calls), or ImageNet weights from a Pretrained init_cfg."""
        cfgs = self.init_cfg if isinstance(self.init_cfg, list) else [self.init_cfg] if self.init_cfg else []
        pretrained = [c for c in cfgs if c.get('type') == 'Pretrained']
        if not pretrained:
            super().init_weights()
            return
        if len(pretrained) > 1:
            raise ValueError('only one Pretrained init_cfg is supported')
        cfg = pretrained[0]
        report = load_backbone_weights(self, cfg['checkpoint'], prefix=cfg.get('prefix'))
        print_log(f'{type(self).__name__}: loaded {cfg["checkpoint"]} (pos_embed resampled to grid '
                  f'{self.patch_embed.grid_size}; skipped {len(report["skipped"])} classifier/norm keys)',
                  logger='current')
        self._is_init = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: (batch, in_chans, H, W) -> one (batch, embed_dim, H / stride, W / stride) map per out index."""
        if self.grid_pad:
            x = F.pad(x, (self.grid_pad,) * 4)
        if self.autocast_dtype is None:
            return tuple(self._features(x))
        with torch.autocast(device_type=x.device.type, dtype=getattr(torch, self.autocast_dtype)):
            feats = self._features(x)
        return tuple(f.float() for f in feats)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_intermediates(
            x, indices=list(self.out_indices), norm=self.final_norm, intermediates_only=True)
