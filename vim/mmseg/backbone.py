"""The mmseg backbone: the residual stream after blocks 5/11/17/23 for a BEiT-style 4-scale pyramid."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from mmseg.registry import MODELS

from vim.mm import VimBackbone

__all__ = ['VisionMambaSeg']


@MODELS.register_module()
class VisionMambaSeg(VimBackbone):
    """Vision Mamba for mmseg: one (batch, C, H/stride, W/stride) map per out index, class token dropped.

    Pair it with mmseg's ``Feature2Pyramid`` neck: ``rescales=[4, 2, 1, 0.5]`` for stride 16 and
    ``[2, 1, 0.5, 0.25]`` for the stride-8 models, both giving strides 4/8/16/32. Defaults are the paper's recipe:
    512² training resolution (pretrained ``pos_embed`` resampled around its middle class-token row), blocks
    5/11/17/23, no final norm. Arguments as :class:`vim.mm.VimBackbone`.
    """

    def __init__(
            self,
            arch: str | dict[str, int] = 'tiny',
            img_size: int | tuple[int, int] = 512,
            patch_size: int = 16,
            stride: int | None = None,
            out_indices: Sequence[int] = (5, 11, 17, 23),
            final_norm: bool = False,
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
