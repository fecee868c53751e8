"""ImageNet weights for the downstream backbones: where a checkpoint comes from and how it is fitted.

A checkpoint is named by one of:

* a local file: an official hustvl/Vim release (a whole training pickle, read safely), a plain state dict, or our
  own ``.safetensors`` export;
* a timm tag, ``vim_tiny_patch16_224.in1k`` (optionally ``timm:``-prefixed): the file of that pretrained config
  on the Hugging Face Hub;
* ``hf-hub:<org>/<repo>/<filename>``: any file on the Hub;
* an ``http(s)://`` URL, downloaded to torch's hub cache.

Whatever the source, the state dict goes through :func:`vim.models.checkpoint_filter_fn`, which converts the
official layout and resamples ``pos_embed`` around its middle class-token row to the backbone's training grid.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from vim.models import VisionMamba, checkpoint_filter_fn, load_checkpoint_file
from vim.models.checkpoint import load_state_dict_strict

__all__ = ['resolve_checkpoint', 'load_backbone_weights']


def resolve_checkpoint(checkpoint: str | os.PathLike) -> Path:
    """Local path of ``checkpoint`` (a path, timm tag, ``hf-hub:`` name or URL), downloading it if needed."""
    name = str(checkpoint)
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if name.startswith(('http://', 'https://')):
        cache = Path(torch.hub.get_dir()) / 'checkpoints'
        cache.mkdir(parents=True, exist_ok=True)
        target = cache / Path(name.split('?')[0]).name
        if not target.is_file():
            torch.hub.download_url_to_file(name, str(target), progress=False)
        return target
    if name.startswith('hf-hub:'):
        repo_and_file = name[len('hf-hub:'):]
        repo_id, _, filename = repo_and_file.rpartition('/')
        if repo_id.count('/') != 1 or not filename:
            raise ValueError(f"hf-hub checkpoints are named 'hf-hub:<org>/<repo>/<filename>', got {name!r}")
        return _hub_download(repo_id, filename)
    tag = name[len('timm:'):] if name.startswith('timm:') else name
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(tag, allow_unregistered=False)
    except (RuntimeError, ValueError, KeyError):
        cfg = None
    if cfg is not None and cfg.hf_hub_id and cfg.hf_hub_filename:
        return _hub_download(cfg.hf_hub_id, cfg.hf_hub_filename)
    raise FileNotFoundError(
        f'Checkpoint {name!r} is neither a file, a URL, an hf-hub: name nor a timm pretrained tag with a Hub file '
        f'(e.g. vim_tiny_patch16_224.in1k).')


def _hub_download(repo_id: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename))


def load_backbone_weights(
        model: VisionMamba,
        checkpoint: str | os.PathLike,
        prefix: str | None = None,
) -> dict[str, list]:
    """Load ImageNet weights into a downstream Vim backbone, strictly except for what the backbone dropped.

    The classifier (``head.*``) is always skipped, and the final norm when the backbone replaced it by an
    identity. ``prefix`` selects a sub-dict (e.g. ``'backbone.'`` of a whole detector's state dict).
    Returns the skipped keys as ``{'skipped': [...]}``.
    """
    state_dict = load_checkpoint_file(resolve_checkpoint(checkpoint))
    if prefix:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not state_dict:
            raise KeyError(f'No key of {checkpoint} starts with prefix {prefix!r}')
    state_dict = checkpoint_filter_fn(state_dict, model)
    own = model.state_dict()
    skipped = sorted(k for k in state_dict if k.startswith('head.') or (k.startswith('norm.') and k not in own))
    state_dict = {k: v for k, v in state_dict.items() if k not in skipped}
    load_state_dict_strict(model, state_dict)
    return {'skipped': skipped}
