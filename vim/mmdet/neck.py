"""ViTDet's simple feature pyramid (Li et al., 2022) as an mmdet neck, and the channel LayerNorm it uses.

mmdet ships its own ``SimpleFPN`` only in ``projects/``, which the pip package does not install.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule, build_norm_layer
from mmdet.registry import MODELS
from mmengine.model import BaseModule

__all__ = ['SimpleFeaturePyramid', 'LayerNorm2d']


@MODELS.register_module()
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (batch, C, H, W) map (``norm_cfg=dict(type='LayerNorm2d')``)."""

    _abbr_ = 'ln'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


@MODELS.register_module()
class SimpleFeaturePyramid(BaseModule):
    """One plain feature map -> ``num_outs`` maps of ``out_channels``, ViTDet style.

    Each scale factor of the input map (4: two stride-2 transposed convs with a norm and GELU between; 2: one;
    1: identity; 0.5 and 0.25: max-pooling) is followed by a 1x1 and a 3x3 conv, each with ``norm_cfg`` and no bias;
    further levels are stride-2 subsamplings of the last one (the "max-pool level"). With a stride-16 input and the
    default factors the outputs have strides 4, 8, 16, 32, 64.

    Args:
        in_channels: channels of the backbone map. out_channels: channels of every output.
        scale_factors: resampling of the input per level, decreasing. num_outs: number of outputs, at least
            ``len(scale_factors)``. norm_cfg: norm after each conv (LayerNorm over channels by default).
        init_cfg: mmengine init config.
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int = 256,
            scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
            num_outs: int = 5,
            norm_cfg: dict | None = None,
            init_cfg: dict | list[dict] | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        if num_outs < len(scale_factors):
            raise ValueError(f'num_outs ({num_outs}) < number of scale factors ({len(scale_factors)})')
        norm_cfg = norm_cfg or dict(type='LayerNorm2d', eps=1e-6)
        self.scale_factors = tuple(float(s) for s in scale_factors)
        self.num_outs = num_outs
        self.stages = nn.ModuleList()
        for scale in self.scale_factors:
            resample, dim = self._resampler(scale, in_channels, norm_cfg)
            self.stages.append(nn.Sequential(
                resample,
                ConvModule(dim, out_channels, 1, bias=False, norm_cfg=norm_cfg, act_cfg=None),
                ConvModule(out_channels, out_channels, 3, padding=1, bias=False, norm_cfg=norm_cfg, act_cfg=None),
            ))

    @staticmethod
    def _resampler(scale: float, dim: int, norm_cfg: dict) -> tuple[nn.Module, int]:
        if scale == 4.0:
            return nn.Sequential(
                nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
                build_norm_layer(norm_cfg, dim // 2)[1],
                nn.GELU(),
                nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
            ), dim // 4
        if scale == 2.0:
            return nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), dim // 2
        if scale == 1.0:
            return nn.Identity(), dim
        if scale in (0.5, 0.25):
            k = int(1 / scale)
            return nn.MaxPool2d(k, stride=k), dim
        raise ValueError(f'scale factors must be among 4, 2, 1, 0.5, 0.25, got {scale}')

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """inputs: a one-element sequence with (batch, in_channels, h, w) -> ``num_outs`` maps, finest first."""
        if len(inputs) != 1:
            raise ValueError(f'SimpleFeaturePyramid takes one feature map, got {len(inputs)}')
        outs = [stage(inputs[0]) for stage in self.stages]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return tuple(outs)
