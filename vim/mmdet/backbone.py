"""The mmdet backbone: ViTDet's recipe, the last block's tokens as a single stride-16 map."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from mmdet.registry import MODELS

from vim.mm import VimBackbone

__all__ = ['VisionMambaDet']


@MODELS.register_module()
class VisionMambaDet(VimBackbone):
    """Vision Mamba for mmdet: the final-normalised last block, class token dropped, as (batch, C, H/16, W/16).

    A plain backbone in the ViTDet sense: the pyramid is built by a neck (:class:`SimpleFeaturePyramid`). Defaults
    are the detection recipe: 1024² training resolution (pretrained ``pos_embed`` resampled to 64x64 around its
    middle class-token row), drop path 0.1. Arguments as :class:`vim.mm.VimBackbone`.
    """

    def __init__(
            self,
            arch: str | dict[str, int] = 'tiny',
            img_size: int | tuple[int, int] = 1024,
            patch_size: int = 16,
            stride: int | None = None,
            out_indices: Sequence[int] = (-1,),
            final_norm: bool = True,
            drop_path_rate: float = 0.1,
            with_cp: bool = False,
            scan_recompute: bool = False,
            autocast_dtype: Literal['bfloat16', 'float16'] | None = None,
            init_cfg: dict | list[dict] | None = None,
    ) -> None:
        super().__init__(
            arch=arch, img_size=img_size, patch_size=patch_size, stride=stride, out_indices=out_indices,
            final_norm=final_norm, drop_path_rate=drop_path_rate, with_cp=with_cp,
            scan_recompute=scan_recompute, autocast_dtype=autocast_dtype, init_cfg=init_cfg)
