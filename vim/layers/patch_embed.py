"""Patch embedding with a stride that may be smaller than the patch (Vim's stride-8 'finer granularity' models).

timm's PatchEmbed has no separate stride, so this is the one layer we keep of our own.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import to_2tuple

__all__ = ['PatchEmbed']


class PatchEmbed(nn.Module):
    """(batch, chans, H, W) -> (batch, grid_h * grid_w, dim) with grid = (size - patch) // stride + 1.

    Args:
        img_size: default input size. patch_size: conv kernel. stride: conv stride (patch_size by default).
        in_chans: input channels. embed_dim: output width.
        strict_img_size: require exactly ``img_size`` (off when the model resamples position embeddings per input).
    """

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            patch_size: int = 16,
            stride: int | None = None,
            in_chans: int = 3,
            embed_dim: int = 192,
            strict_img_size: bool = True,
    ) -> None:
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.stride = to_2tuple(stride or patch_size)
        self.in_chans = in_chans
        self.strict_img_size = strict_img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.stride)
        self.set_input_size(img_size)

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        self.img_size = to_2tuple(img_size)
        self.grid_size = self.feat_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid (rows, cols) of an input of ``img_size`` (height, width); raises if it does not tile."""
        grid = []
        for size, patch, stride, name in zip(img_size, self.patch_size, self.stride, ('height', 'width')):
            if size < patch or (size - patch) % stride:
                raise ValueError(
                    f'Input {name} {size} does not tile with patch {patch} and stride {stride}: it must be '
                    f'{patch} + k * {stride} (e.g. {max(patch, (size - patch) // stride * stride + patch)}).')
            grid.append((size - patch) // stride + 1)
        return grid[0], grid[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f'Expected images of shape (batch, {self.in_chans}, H, W), got {tuple(x.shape)}.')
        size = (x.shape[2], x.shape[3])
        if self.strict_img_size and size != self.img_size:
            raise ValueError(
                f'Input size {size} does not match the model ({self.img_size}). Create the model with '
                f'dynamic_img_size=True for any size, or img_size={size} to resample its position embeddings.')
        self.feat_size(size)
        return self.proj(x).flatten(2).transpose(1, 2)
