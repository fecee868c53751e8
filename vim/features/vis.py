"""A picture of patch features: the input beside the top three principal components of a feature map as RGB."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ['pca_rgb', 'vis_name', 'vis_png']


def pca_rgb(fmap: torch.Tensor) -> np.ndarray:
    """(C, h, w) features -> (h, w, 3) uint8: the top three principal components, each stretched to 0..255."""
    c, h, w = fmap.shape
    x = fmap.float().reshape(c, h * w).T
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    y = x @ v[:3].T  # (h * w, k), k = min(3, C, h * w)
    y = torch.cat([y, y.new_zeros(h * w, 3 - y.shape[1])], 1)
    lo, hi = torch.quantile(y, 0.01, dim=0), torch.quantile(y, 0.99, dim=0)
    y = ((y - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    return (y.reshape(h, w, 3) * 255).round().byte().numpy()


def vis_png(x: torch.Tensor, fmap: torch.Tensor, mean, std) -> bytes:
    """PNG bytes: the normalised input x (3, H, W) shown as the model saw it, beside the PCA picture of fmap."""
    img = (x.float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]).clamp(0, 1)
    left = Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy())
    right = Image.fromarray(pca_rgb(fmap.cpu())).resize(left.size, Image.NEAREST)
    canvas = Image.new('RGB', (left.width * 2 + 8, left.height), 'white')
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + 8, 0))
    buf = io.BytesIO()
    canvas.save(buf, format='PNG')
    return buf.getvalue()


def vis_name(key: str) -> str:
    """vis/ file name of an image: its stem and a hash of its key (stems repeat across folders)."""
    return f'{Path(key).stem}-{hashlib.sha1(key.encode()).hexdigest()[:8]}.png'
