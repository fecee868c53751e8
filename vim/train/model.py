"""What a training run (vim.train.Trainer) trains and what it minimises: the model with its initial weights, and
the loss with the mixup/cutmix that feeds it."""
from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from vim.eval.model import is_vim_model


def create_model(args: argparse.Namespace, num_classes: int, initial_weights: bool = True) -> torch.nn.Module:
    """The model, with --pretrained / --initial-checkpoint weights unless ``initial_weights`` is False (a resumed
    run, whose weights come from its state: no download needed)."""
    kwargs = dict(num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path)
    if args.img_size is not None:
        kwargs['img_size'] = args.img_size
    if not initial_weights:
        return timm.create_model(args.model, pretrained=False, **kwargs)
    source = args.initial_checkpoint
    if source.startswith('hf-hub:'):
        parts = source[len('hf-hub:'):].split('/')
        if len(parts) < 3:
            raise ValueError(f'--initial-checkpoint {source}: expected hf-hub:ORG/REPO/FILE')
        overlay = dict(hf_hub_id='/'.join(parts[:2]), hf_hub_filename='/'.join(parts[2:]),
                       custom_load='hf' if is_vim_model(args.model) else False)
        return timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    if source:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f'--initial-checkpoint {path} not found')
        return timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    return timm.create_model(args.model, pretrained=args.pretrained, **kwargs)


def create_criterion(args: argparse.Namespace, num_classes: int) -> tuple[Mixup | None, torch.nn.Module]:
    """(mixup, loss): with mixup/cutmix on, ``mixup(images, labels (B,))`` gives soft targets (B, num_classes) for
    a soft-target cross-entropy; otherwise no mixup and a (label-smoothing) cross-entropy on the labels."""
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        if args.batch_size % 2:
            raise ValueError('mixup/cutmix needs an even --batch-size')
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                      prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                      label_smoothing=args.smoothing, num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()  # the smoothing is in the mixed targets
    if args.smoothing:
        return None, LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return None, torch.nn.CrossEntropyLoss()
