"""The classifier an evaluation runs: a timm model with its weights from a hub tag or a local checkpoint file.

Importing any ``vim`` module registers the Vim models with timm, so ``create_model`` takes their names too."""
from __future__ import annotations

from pathlib import Path

import timm
import torch

from vim.models import load_checkpoint_file


def is_vim_model(model_name: str) -> bool:
    """Whether the registered model comes from this package (and so reads official files via load_pretrained)."""
    return timm.models.model_entrypoint(model_name.split('.')[0]).__module__.startswith('vim.')


def checkpoint_num_classes(model_name: str, path: str | Path) -> int | None:
    """Rows of the classifier weight stored in a checkpoint, or None when it has no classifier."""
    if is_vim_model(model_name):
        state_dict = load_checkpoint_file(path)
    else:
        state_dict = timm.models.load_state_dict(str(path), use_ema=False)
    classifier = timm.models.get_pretrained_cfg_value(model_name, 'classifier') or 'head'
    for name in (classifier if isinstance(classifier, (list, tuple)) else [classifier]):
        weight = state_dict.get(f'{name}.weight')
        if weight is not None:
            return int(weight.shape[0])
    return None


def create_model(
        model_name: str,
        pretrained: bool = False,
        checkpoint: str | Path = '',
        num_classes: int | None = None,
        img_size: int | None = None,
        **kwargs,
) -> torch.nn.Module:
    """A timm model with weights from its hub tag (``pretrained``) or a local ``checkpoint`` file.

    Vim models read the file through ``pretrained_cfg_overlay=dict(file=...)`` (official pickles, state dicts,
    safetensors, training states; the position embedding is resampled for ``img_size``). Other models are built
    and then loaded strictly with ``timm.models.load_checkpoint``.
    """
    if checkpoint and num_classes is None:
        num_classes = checkpoint_num_classes(model_name, checkpoint)
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    if img_size is not None:
        kwargs['img_size'] = img_size
    if checkpoint and is_vim_model(model_name):
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)),
                                 **kwargs)
    try:
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except TypeError:
        if 'img_size' not in kwargs:
            raise
        kwargs.pop('img_size')  # a model without an input-size argument (e.g. a CNN) takes any size
        model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    if checkpoint:
        timm.models.load_checkpoint(model, str(checkpoint), use_ema=False, strict=True)
    return model
