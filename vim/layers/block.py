"""One Vim layer: residual add, RMSNorm (residual kept in fp32), bidirectional Mamba mixer."""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import DropPath, RmsNorm

from .mixer import BidirectionalMamba, widened_dtype

__all__ = ['Block']


class Block(nn.Module):
    """Mamba-style pre-norm block, matching the official Vim numerics.

    ``forward(hidden, residual)`` first adds the *previous* layer's output to the residual stream (with drop path),
    then normalises and mixes: ``residual = residual + drop_path(hidden); hidden = mixer(norm(residual))``. The
    first block is called with ``residual=None`` and takes the embeddings as the residual. The residual stream is
    fp32 (or wider) whatever the activation dtype.

    Args:
        dim: width. drop_path: rate applied to the incoming hidden state. norm_eps: RMSNorm epsilon.
        mixer_kwargs: keyword arguments of :class:`BidirectionalMamba`.
        device, dtype: factory arguments of the parameters.
    """

    def __init__(self, dim: int, *, drop_path: float = 0.0, norm_eps: float = 1e-5,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, **mixer_kwargs) -> None:
        super().__init__()
        self.norm = RmsNorm(dim, eps=norm_eps, device=device, dtype=dtype)
        self.mixer = BidirectionalMamba(dim, device=device, dtype=dtype, **mixer_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden, residual: (batch, seqlen, dim) -> (mixer output, fp32 residual stream)."""
        stream_dtype = widened_dtype(hidden)
        if residual is None:
            residual = hidden.to(stream_dtype)
        else:
            residual = residual + self.drop_path(hidden).to(stream_dtype)
        # as the official fused add+norm: the norm in its weight's dtype (fp32 unless the whole model was cast),
        # the mixer in the activation dtype
        normed = self.norm(residual.to(self.norm.weight.dtype))
        return self.mixer(normed.to(hidden.dtype)), residual
