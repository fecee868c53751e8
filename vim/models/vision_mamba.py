"""Vision Mamba (Vim, Zhu et al., ICML 2024): a plain, ViT-like stack of bidirectional Mamba blocks.

Numerically the official hustvl/Vim model (middle class token, absolute position embeddings, RMSNorm with an fp32
residual stream, averaged bidirectional scans); parameter names are ours, and ``checkpoint_filter_fn`` converts
the official layout. Registered in timm: ``timm.create_model('vim_tiny_patch16_224', pretrained=True)``.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, RmsNorm, register_notrace_function, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import named_apply

from vim.layers import BidirectionalMamba, Block, PatchEmbed
from vim.layers.patch_embed import token_grid

from .checkpoint import (
    is_official_layout,
    load_checkpoint_file,
    load_state_dict_strict,
    official_to_vim,
    resample_pos_embed,
)

__all__ = ['VisionMamba', 'checkpoint_filter_fn']


@register_notrace_function  # shape-dependent (middle index, resampling): torch.fx keeps it a call evaluated per input
def insert_cls_token_and_pos_embed(x: torch.Tensor, cls_token: torch.Tensor, pos_embed: torch.Tensor,
                                   grid: tuple[int, int], pos_grid: tuple[int, int], antialias: bool = True
                                   ) -> torch.Tensor:
    """x: (batch, M, C) patch tokens on a ``grid`` -> (batch, M + 1, C) with the class token (1, 1, C) at index
    M // 2, plus the position embedding (1, pos_grid rows * cols + 1, C), resampled to ``grid`` if it differs
    (bicubic, ``antialias`` as :func:`vim.models.checkpoint.resample_pos_embed`)."""
    if tuple(grid) != tuple(pos_grid):
        pos_embed = resample_pos_embed(pos_embed, grid, pos_grid, antialias=antialias)
    mid = x.shape[1] // 2
    x = torch.cat([x[:, :mid], cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x[:, mid:]], dim=1)
    return x + pos_embed.to(x.dtype)


class VisionMamba(nn.Module):
    """Vision Mamba.

    Tokens: patch embedding, a class token inserted at index ``M // 2`` of the ``M`` patch tokens, then absolute
    position embeddings (whose row ``M // 2`` is the class token's). Then ``depth`` :class:`Block` s, a final
    residual add and RMSNorm, and the head on the class token (``global_pool='token'``) or the mean of the
    patch tokens (``'avg'``).

    Args:
        img_size: default input size. patch_size: patch (conv kernel) size. stride: patch stride, ``patch_size``
            by default; 8 gives the "finer granularity" models.
        in_chans: input channels. num_classes: classifier outputs (0 for none). global_pool: 'token', 'avg' or ''.
        embed_dim: width. depth: number of blocks. d_state, d_conv, expand, dt_rank: mixer sizes.
        drop_rate: dropout before the head. pos_drop_rate: dropout after position embedding.
        drop_path_rate: stochastic depth, linear over the blocks.
        norm_eps: RMSNorm epsilon. dynamic_img_size: accept any input size that tiles with the patch stride,
            resampling the position embedding per input.
        scan_recompute: in training, each mixer keeps only in_proj's output and runs its conv, projections and
            scan again in the backward (:meth:`set_scan_recompute`).
        device, dtype: factory arguments of every parameter (e.g. ``device='meta'`` to build without memory,
            then ``to_empty`` and :meth:`init_weights`).
    """

    # Per-forward resampling (dynamic_img_size): timm's antialiased bicubic, as timm's ViTs do. Checkpoints loaded at
    # another size get the official plain bicubic instead (see vim.models.checkpoint.resample_pos_embed).
    dynamic_pos_embed_antialias: bool = True

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            patch_size: int = 16,
            stride: int | None = None,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: Literal['token', 'avg', ''] = 'token',
            embed_dim: int = 192,
            depth: int = 24,
            d_state: int = 16,
            d_conv: int = 4,
            expand: int = 2,
            dt_rank: int | None = None,
            drop_rate: float = 0.0,
            pos_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_eps: float = 1e-5,
            dynamic_img_size: bool = False,
            scan_recompute: bool = False,
            device: torch.device | str | None = None,
            dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.in_chans = in_chans
        self.num_prefix_tokens = 1
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.scan_recompute = scan_recompute

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, stride=stride, in_chans=in_chans, embed_dim=embed_dim,
            strict_img_size=not dynamic_img_size, **dd)
        reduction = self.patch_embed.stride[0]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        # Official stochastic depth: block i drops the output of block i - 1 with rate dpr[i - 1]; the final add
        # drops the last block's output with the full rate.
        dpr = torch.linspace(0, drop_path_rate, depth, device='cpu').tolist()
        self.layers = nn.ModuleList([
            Block(embed_dim, drop_path=([0.0] + dpr)[i], norm_eps=norm_eps, d_state=d_state, d_conv=d_conv,
                  expand=expand, dt_rank=dt_rank, scan_recompute=scan_recompute, **dd)
            for i in range(depth)])
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm = RmsNorm(embed_dim, eps=norm_eps, **dd)
        self.feature_info = [dict(module=f'layers.{i}', num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes, global_pool)
        self.init_weights()

    # ---- initialisation and timm plumbing -------------------------------------------------------------------
    def init_weights(self) -> None:
        """Initialise every parameter (also after ``to_empty``): the official scheme, Mamba's for the mixers."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        named_apply(partial(_init_weights, depth=len(self.layers)), self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # the mixer's D, conv and dt biases are 1-D per direction in the official model (stacked here)
        return {'pos_embed', 'cls_token', 'layers.*.mixer.D', 'layers.*.mixer.conv_bias', 'layers.*.mixer.dt_proj_bias'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r'^cls_token|pos_embed|patch_embed', blocks=[(r'^layers\.(\d+)', None), (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each whole block in the backward (timm's knob). It covers what :meth:`set_scan_recompute` would
        recompute, so the mixers' own recompute pauses while it is on (a third forward scan a layer otherwise)."""
        self.grad_checkpointing = enable
        self._update_mixers()

    def _update_mixers(self) -> None:
        for block in self.layers:
            block.mixer.scan_recompute = self.scan_recompute and not self.grad_checkpointing

    @torch.jit.ignore
    def set_scan_recompute(self, enable: bool = True) -> None:
        """Trade memory for time in training, a finer knob than :meth:`set_grad_checkpointing`: each mixer keeps
        only in_proj's output for the backward and runs its conv, x_proj, dt_proj and scan forward again there
        (non-reentrant ``torch.utils.checkpoint``), so that the conv's output, the step sizes and the scan's chunk
        states (fp32, 16 bytes per token and channel on the Triton backend) are held for one layer at a time
        instead of all. The norms, in_proj and out_proj are not recomputed. Same gradients bit for bit; any
        backend."""
        self.scan_recompute = enable
        self._update_mixers()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('token', 'avg', ''):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        dd = dict(device=self.cls_token.device, dtype=self.cls_token.dtype)  # where the model is now
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def set_input_size(self, img_size: int | tuple[int, int] | None = None, **kwargs: Any) -> None:
        """Change the default input size, resampling the position embedding around the middle class token."""
        if kwargs.get('patch_size') is not None:
            raise ValueError('Changing the patch size of a Vim model is not supported.')
        if img_size is None:
            return
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size)
        with torch.no_grad():
            pos = resample_pos_embed(self.pos_embed.data, self.patch_embed.grid_size, old_grid)
        self.pos_embed = nn.Parameter(pos, requires_grad=self.pos_embed.requires_grad)

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str | Path, prefix: str = '') -> None:
        """Load an official or own checkpoint file (timm calls this for ``pretrained=True``).

        The classifier is kept from the model when its class count differs from the checkpoint's.
        """
        state_dict = checkpoint_filter_fn(load_checkpoint_file(checkpoint_path), self)
        head_w = state_dict.get('head.weight')
        if head_w is not None and (self.num_classes == 0 or head_w.shape[0] != self.num_classes):
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith('head.')}
            state_dict.update({f'head.{k}': v for k, v in self.head.state_dict().items()})
        load_state_dict_strict(self, state_dict)

    # ---- forward -------------------------------------------------------------------------------------------
    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """x: (batch, M, C) patch tokens -> (batch, M + 1, C) with the class token at index M // 2."""
        x = insert_cls_token_and_pos_embed(x, self.cls_token, self.pos_embed, grid, self.patch_embed.grid_size,
                                           antialias=self.dynamic_pos_embed_antialias)
        return self.pos_drop(x)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """images (batch, in_chans, H, W) -> (tokens (batch, M + 1, C), token grid (rows, cols))."""
        tokens = self.patch_embed(x)  # checks x
        grid = token_grid(x, self.patch_embed.patch_size, self.patch_embed.stride)
        return self._pos_embed(tokens, grid), grid

    def _run_block(self, block: Block, hidden: torch.Tensor, residual: torch.Tensor | None):
        if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
            return checkpoint(block, hidden, residual)
        return block(hidden, residual)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs of chosen layers (the residual stream after each), class token dropped.

        Args:
            x: (batch, in_chans, H, W).
            indices: last n layers if int, all if None, else the listed layer indices (negative from the end).
            return_prefix_tokens: also return each layer's class token, as (feature map, (batch, 1, C)) pairs.
            norm: apply the final norm to each intermediate.
            stop_early: stop after the last requested layer.
            output_fmt: 'NCHW' maps (batch, C, grid_h, grid_w) or 'NLC' tokens (batch, grid_h * grid_w, C).
            intermediates_only: return only the list of intermediates.
        Returns:
            intermediates, or (final normalised tokens (batch, M + 1, C), intermediates).
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        batch = x.shape[0]
        hidden, grid = self._embed(x)
        layers = self.layers[:max_index + 1] if stop_early or intermediates_only else self.layers
        residual = None
        intermediates = []
        for i, block in enumerate(layers):
            hidden, residual = self._run_block(block, hidden, residual)
            if i in take_indices:
                out = residual + hidden  # the stream the next block would normalise
                intermediates.append((self._norm(out) if norm else out).to(hidden.dtype))
        mid = (hidden.shape[1] - 1) // 2
        prefix = [y[:, mid:mid + 1] for y in intermediates]
        intermediates = [torch.cat([y[:, :mid], y[:, mid + 1:]], dim=1) for y in intermediates]
        if output_fmt == 'NCHW':
            intermediates = [y.reshape(batch, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        if len(layers) < len(self.layers):
            for block in self.layers[len(layers):]:
                hidden, residual = self._run_block(block, hidden, residual)
        return self._final_norm(hidden, residual), intermediates

    def prune_intermediate_layers(
            self,
            indices: int | list[int] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Drop the layers after the last of ``indices`` (and the final norm / head if asked)."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def _final_norm(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self._norm(residual + self.drop_path(hidden).to(residual.dtype)).to(hidden.dtype)

    def _norm(self, stream: torch.Tensor) -> torch.Tensor:
        weight = getattr(self.norm, 'weight', None)  # the norm is an Identity after pruning
        return self.norm(stream if weight is None else stream.to(weight.dtype))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, in_chans, H, W) -> normalised tokens (batch, M + 1, C), class token at index M // 2."""
        hidden, _ = self._embed(x)
        residual = None
        for block in self.layers:
            hidden, residual = self._run_block(block, hidden, residual)
        return self._final_norm(hidden, residual)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """tokens (batch, M + 1, C) -> logits (batch, num_classes), or pooled features if ``pre_logits``."""
        mid = (x.shape[1] - 1) // 2
        if self.global_pool == 'token':
            x = x[:, mid]
        elif self.global_pool == 'avg':
            x = torch.cat([x[:, :mid], x[:, mid + 1:]], dim=1).mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module, name: str = '', depth: int = 24) -> None:
    """The official initialisation: trunc-normal linears and patch conv, out_proj rescaled by 1/sqrt(depth)."""
    if isinstance(module, nn.Linear):
        if name.endswith('out_proj'):
            nn.init.kaiming_uniform_(module.weight, a=5 ** 0.5)
            with torch.no_grad():
                module.weight /= depth ** 0.5
        elif name.endswith('in_proj'):
            nn.init.kaiming_uniform_(module.weight, a=5 ** 0.5)
        else:
            trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (BidirectionalMamba, RmsNorm)):
        module.reset_parameters()  # their own parameters only; the mixer's linears are handled above


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: VisionMamba) -> dict[str, torch.Tensor]:
    """Convert an official hustvl/Vim state dict (or ours) for ``model``; resample pos_embed to its grid."""
    state_dict = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}
    if is_official_layout(state_dict):
        state_dict = official_to_vim(state_dict)
    pos = state_dict.get('pos_embed')
    if pos is not None and pos.shape[1] != model.pos_embed.shape[1]:
        state_dict['pos_embed'] = resample_pos_embed(pos, model.patch_embed.grid_size)
    return state_dict


def _create_vision_mamba(variant: str, pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    out_indices = kwargs.pop('out_indices', 3)
    overlay = kwargs.get('pretrained_cfg_overlay')
    if overlay and (overlay.get('file') or overlay.get('url')):
        # timm would read a user-given file with its generic loader, which prefers 'model_ema' and cannot read the
        # official pickles; route it through VisionMamba.load_pretrained unless the caller chose otherwise.
        kwargs['pretrained_cfg_overlay'] = {'custom_load': True, **overlay}
    return build_model_with_cfg(
        VisionMamba, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(hf_hub_id: str = '', hf_hub_filename: str = '', **kwargs: Any) -> dict[str, Any]:
    return {
        'hf_hub_id': hf_hub_id, 'hf_hub_filename': hf_hub_filename, 'custom_load': 'hf' if hf_hub_id else True,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        # the models accept only their input size unless created with dynamic_img_size=True (as timm's ViTs)
        'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head', 'license': 'apache-2.0',
        'paper_ids': 'arXiv:2401.09417', 'paper_name': 'Vision Mamba', 'origin_url': 'https://github.com/hustvl/Vim',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'vim_tiny_patch16_224.in1k': _cfg('hustvl/Vim-tiny-midclstok', 'vim_t_midclstok_76p1acc.pth'),
    'vim_small_patch16_224.in1k': _cfg('hustvl/Vim-small-midclstok', 'vim_s_midclstok_80p5acc.pth'),
    'vim_base_patch16_224.in1k': _cfg('hustvl/Vim-base-midclstok', 'vim_b_midclstok_81p9acc.pth'),
    'vim_tiny_patch16_stride8_224.in1k': _cfg('hustvl/Vim-tiny-midclstok', 'vim_t_midclstok_ft_78p3acc.pth'),
    'vim_small_patch16_stride8_224.in1k': _cfg('hustvl/Vim-small-midclstok', 'vim_s_midclstok_ft_81p6acc.pth'),
    'test_vim.untrained': _cfg(input_size=(3, 64, 64), crop_pct=1.0),
})


@register_model
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    model_args = dict(patch_size=16, embed_dim=192, depth=24)
    return _create_vision_mamba('vim_tiny_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vim_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    model_args = dict(patch_size=16, embed_dim=384, depth=24)
    return _create_vision_mamba('vim_small_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vim_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    model_args = dict(patch_size=16, embed_dim=768, depth=24)
    return _create_vision_mamba('vim_base_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vim_tiny_patch16_stride8_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    model_args = dict(patch_size=16, stride=8, embed_dim=192, depth=24)
    return _create_vision_mamba('vim_tiny_patch16_stride8_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vim_small_patch16_stride8_224(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    model_args = dict(patch_size=16, stride=8, embed_dim=384, depth=24)
    return _create_vision_mamba('vim_small_patch16_stride8_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_vim(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
    """A tiny Vim for fast tests: 64x64 input, 8x8 patches, width 32, 4 blocks, state size 4."""
    model_args = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, d_state=4)
    return _create_vision_mamba('test_vim', pretrained=pretrained, **dict(model_args, **kwargs))
