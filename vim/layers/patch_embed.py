"""Patch embedding with a stride that may be smaller than the patch (Vim's stride-8 'finer granularity' models).

timm's PatchEmbed has no separate stride, so this is the one layer we keep of our own. Its shape checks and grid
computation run in :func:`token_grid` and :func:`checked_images`, registered with timm as not traced, so that
``torch.fx`` (timm's and torchvision's feature extractors) keeps them as calls evaluated on every input.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import register_notrace_function, to_2tuple

__all__ = ['PatchEmbed', 'token_grid', 'checked_images']


def _grid(img_size: tuple[int, int], patch_size: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int]:
    grid = []
    for size, patch, step, name in zip(img_size, patch_size, stride, ('height', 'width')):
        if size < patch or (size - patch) % step:
            raise ValueError(
                f'Input {name} {size} does not tile with patch {patch} and stride {step}: it must be '
                f'{patch} + k * {step} (e.g. {max(patch, (size - patch) // step * step + patch)}).')
        grid.append((size - patch) // step + 1)
    return grid[0], grid[1]


@register_notrace_function
def token_grid(x: torch.Tensor, patch_size: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int]:
    """Token grid (rows, cols) of images x: (batch, chans, H, W); raises if H or W does not tile."""
    return _grid((x.shape[-2], x.shape[-1]), patch_size, stride)


@register_notrace_function
def checked_images(x: torch.Tensor, in_chans: int, img_size: tuple[int, int] | None, patch_size: tuple[int, int],
                   stride: tuple[int, int]) -> torch.Tensor:
    """x unchanged after checking it is (batch, in_chans, H, W), of size ``img_size`` unless None, and tiles."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f'Expected images of shape (batch, {in_chans}, H, W), got {tuple(x.shape)}.')
    size = (x.shape[2], x.shape[3])
    if img_size is not None and size != img_size:
        raise ValueError(
            f'Input size {size} does not match the model ({img_size}). Create the model with '
            f'dynamic_img_size=True for any size, or img_size={size} to resample its position embeddings.')
    _grid(size, patch_size, stride)
    return x


class PatchEmbed(nn.Module):
    """(batch, chans, H, W) -> (batch, grid_h * grid_w, dim) with grid = (size - patch) // stride + 1.

    Args:
        img_size: default input size. patch_size: conv kernel. stride: conv stride (patch_size by default).
        in_chans: input channels. embed_dim: output width.
        strict_img_size: require exactly ``img_size`` (off when the model resamples position embeddings per input).
        device, dtype: factory arguments of the parameters.
    """

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            patch_size: int = 16,
            stride: int | None = None,
            in_chans: int = 3,
            embed_dim: int = 192,
            strict_img_size: bool = True,
            device: torch.device | str | None = None,
            dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.stride = to_2tuple(stride or patch_size)
        self.in_chans = in_chans
        self.strict_img_size = strict_img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.stride,
                              device=device, dtype=dtype)
        self.set_input_size(img_size)

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        self.img_size = to_2tuple(img_size)
        self.grid_size = self.feat_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid (rows, cols) of an input of ``img_size`` (height, width); raises if it does not tile."""
        return _grid(img_size, self.patch_size, self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = checked_images(x, self.in_chans, self.img_size if self.strict_img_size else None, self.patch_size,
                           self.stride)
        return self.proj(x).flatten(2).transpose(1, 2)
