"""Checkpoint files and layouts: safe loading of the official training pickles, official <-> our names,
position-embedding resampling around the middle class token, and strict loading with readable errors."""
from __future__ import annotations

import argparse
import math
import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

__all__ = [
    'load_checkpoint_file', 'official_to_vim', 'vim_to_official', 'is_official_layout',
    'resample_pos_embed', 'load_state_dict_strict', 'CheckpointError',
]

StateDict = dict[str, torch.Tensor]

# (official per-direction names, our stacked name); index 0 of the stacked axis is the forward direction.
_DIRECTIONAL = (
    (('conv1d.weight', 'conv1d_b.weight'), 'conv_weight'),
    (('conv1d.bias', 'conv1d_b.bias'), 'conv_bias'),
    (('x_proj.weight', 'x_proj_b.weight'), 'x_proj_weight'),
    (('dt_proj.weight', 'dt_proj_b.weight'), 'dt_proj_weight'),
    (('dt_proj.bias', 'dt_proj_b.bias'), 'dt_proj_bias'),
    (('A_log', 'A_b_log'), 'A_log'),
    (('D', 'D_b'), 'D'),
)
_RENAMED = (('norm_f.', 'norm.'),)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into the model; the message lists every offending key."""


def load_checkpoint_file(path: str | Path) -> StateDict:
    """Read a state dict from a safetensors file, a plain ``torch.save`` state dict, or a whole training pickle.

    Training pickles such as the official releases (``{'model', 'model_ema', 'optimizer', 'epoch', 'args'}``) are
    read with ``torch.load(weights_only=True)`` with only ``argparse.Namespace`` allow-listed, never with a
    blanket unpickle; ``'model'`` is taken (not ``'model_ema'``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint file not found: {path}')
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f'{path} holds objects outside the allow-list of the safe loader (weights_only=True); it was not '
            f'unpickled. Details: {e}') from None
    if isinstance(ckpt, dict):
        for key in ('model', 'state_dict'):
            if key in ckpt and isinstance(ckpt[key], dict):
                return ckpt[key]
        if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return ckpt
    raise CheckpointError(f'{path} is neither a state dict nor a training checkpoint with a "model" entry.')


def is_official_layout(state_dict: StateDict) -> bool:
    return any(k.endswith('mixer.A_b_log') or k == 'norm_f.weight' for k in state_dict)


def official_to_vim(state_dict: StateDict) -> StateDict:
    """Official hustvl/Vim names -> ours: per-direction mixer tensors stacked, ``norm_f`` -> ``norm``."""
    out: StateDict = {}
    pending: dict[str, list] = {}
    for k, v in state_dict.items():
        if k.startswith('module.'):
            k = k[len('module.'):]
        for old, new in _RENAMED:
            if k.startswith(old):
                k = new + k[len(old):]
        m = re.match(r'(layers\.\d+\.mixer\.)(.+)$', k)
        target = None
        if m:
            for (fwd, bwd), ours in _DIRECTIONAL:
                if m.group(2) in (fwd, bwd):
                    target = (m.group(1) + ours, 0 if m.group(2) == fwd else 1)
        if target is None:
            out[k] = v
            continue
        if v.dim() == 3 and ours_is_conv(target[0]):
            v = v.squeeze(1)  # (d_inner, 1, k) depthwise conv weight -> (d_inner, k)
        pending.setdefault(target[0], [None, None])[target[1]] = v
    for name, (fwd, bwd) in pending.items():
        if fwd is None or bwd is None:
            # leave the lone half under its own name so that the strict loader reports it
            out[name + ('.forward_only' if bwd is None else '.backward_only')] = fwd if bwd is None else bwd
        else:
            out[name] = torch.stack([fwd, bwd])
    return out


def ours_is_conv(name: str) -> bool:
    return name.endswith('conv_weight')


def vim_to_official(state_dict: StateDict) -> StateDict:
    """Our names -> official hustvl/Vim names (inverse of :func:`official_to_vim`)."""
    out: StateDict = {}
    by_ours = {ours: pair for pair, ours in _DIRECTIONAL}
    for k, v in state_dict.items():
        if k.startswith('norm.'):
            k = 'norm_f.' + k[len('norm.'):]
        m = re.match(r'(layers\.\d+\.mixer\.)(.+)$', k)
        if m and m.group(2) in by_ours:
            fwd, bwd = by_ours[m.group(2)]
            halves = [v[0], v[1]]
            if ours_is_conv(k):
                halves = [h.unsqueeze(1) for h in halves]
            out[m.group(1) + fwd] = halves[0].contiguous()
            out[m.group(1) + bwd] = halves[1].contiguous()
        else:
            out[k] = v
    return out


def _square_grid(num_patches: int) -> tuple[int, int]:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise CheckpointError(f'pos_embed has {num_patches} patch rows, not a square grid; pass its grid size.')
    return side, side


def resample_pos_embed(
        pos_embed: torch.Tensor,
        new_grid: Sequence[int],
        old_grid: Sequence[int] | None = None,
        interpolation: str = 'bicubic',
        antialias: bool = False,
) -> torch.Tensor:
    """Resample a Vim position embedding whose class-token row sits in the middle of the sequence.

    pos_embed: (1, M + 1, C), class row at index M // 2 -> (1, M' + 1, C), class row at index M' // 2, with
    M' = new_grid[0] * new_grid[1]. Only the M patch rows are interpolated, as a (C, *old_grid) image, in fp32
    (returned in the input dtype); the class row is carried over unchanged.

    Two conventions, both bicubic with ``align_corners=False``:

    * ``antialias=False`` (the default): plain ``F.interpolate``, what the official DeiT and Vim recipes use when
      they load a checkpoint at another size (ImageNet fine-tuning at 384², the stride-8 fine-tune, detection and
      segmentation initialisation). Checkpoint loading (:func:`vim.models.checkpoint_filter_fn`) and
      ``VisionMamba.set_input_size`` use it, so downstream numbers start from the same weights as the paper's.
    * ``antialias=True``: timm's ``resample_abs_pos_embed`` default (PIL-style bicubic kernel, also when
      upsampling), which timm models apply per forward with ``dynamic_img_size=True``; ``VisionMamba`` keeps it
      there so that it behaves like timm's ViTs.

    The two differ by ~1e-2 (14x14 -> 64x64 on a trained table).
    """
    num_patches = pos_embed.shape[1] - 1
    old_grid = tuple(old_grid) if old_grid is not None else _square_grid(num_patches)
    new_grid = tuple(new_grid)
    if old_grid[0] * old_grid[1] != num_patches:
        raise CheckpointError(f'pos_embed has {num_patches} patch rows, which does not match grid {old_grid}.')
    if old_grid == new_grid:
        return pos_embed
    cls_idx = num_patches // 2
    cls_row = pos_embed[:, cls_idx:cls_idx + 1]
    patches = torch.cat([pos_embed[:, :cls_idx], pos_embed[:, cls_idx + 1:]], dim=1)
    # align_corners is left at F.interpolate's default (False): timm added the argument only in 1.0.31
    patches = resample_abs_pos_embed(
        patches, new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=0,
        interpolation=interpolation, antialias=antialias)
    new_idx = (new_grid[0] * new_grid[1]) // 2
    return torch.cat([patches[:, :new_idx], cls_row, patches[:, new_idx:]], dim=1)


def load_state_dict_strict(model: nn.Module, state_dict: StateDict) -> None:
    """``model.load_state_dict(strict=True)`` with one error that lists missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    mismatched = [
        f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}'
        for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f'{len(mismatched)} shape mismatch(es) (a checkpoint of another variant?):\n  '
                         + '\n  '.join(mismatched))
        if missing:
            parts.append(f'{len(missing)} missing key(s): ' + ', '.join(missing))
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected key(s): ' + ', '.join(unexpected))
        raise CheckpointError(f'Checkpoint does not fit {type(model).__name__}:\n' + '\n'.join(parts))
    model.load_state_dict(state_dict, strict=True)
