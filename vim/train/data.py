"""The loaders of a training run (vim.train.Trainer): the augmented, resumable training loader and the validation
loader."""
from __future__ import annotations

import argparse
import itertools
import logging

import torch
from timm.data import create_transform
from timm.data.distributed_sampler import RepeatAugSampler

from vim.eval.loop import create_eval_loader

_logger = logging.getLogger('vim.train')


def allow_zero_bit_posterize() -> bool:
    """Let timm's RandAugment posterize to 0 bits again (a black image) under Pillow versions that refuse it.

    The official policy 'rand-m9-mstd0.5-inc1' uses PosterizeIncreasing, which keeps ``4 - int(4 * m / 10)`` bits;
    the magnitude noise reaches the cap m = 10 in ~2% of draws, asking for 0 bits. Older Pillow (and the TF
    reference) returned black; Pillow 13 raises ValueError, which would kill a run within minutes on ImageNet.
    Returns whether timm's op table was patched.
    """
    from PIL import Image, ImageOps
    from timm.data import auto_augment

    try:
        ImageOps.posterize(Image.new('RGB', (1, 1)), 0)
        return False
    except ValueError:
        pass
    original = auto_augment.posterize

    def posterize(img, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:
            return img.point([0] * 256 * len(img.getbands()))  # what ImageOps.posterize(img, 0) used to do
        return original(img, bits_to_keep, **kwargs)

    patched = False
    for name, op in auto_augment.NAME_TO_OP.items():
        if op is original:
            auto_augment.NAME_TO_OP[name] = posterize
            patched = True
    return patched


class ResumableSampler(torch.utils.data.Sampler):
    """An epoch-seeded sampler whose next pass can skip its first ``skip`` indices (the batches done before an
    interruption), so that a resumed epoch sees exactly the images the interrupted one had left."""

    def __init__(self, sampler: torch.utils.data.Sampler) -> None:
        self.sampler = sampler
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.sampler), skip, None)

    def __len__(self) -> int:
        return len(self.sampler)


def create_train_loader(args: argparse.Namespace, dataset, data_config: dict,
                        pin_memory: bool) -> torch.utils.data.DataLoader:
    """Batches of (images (B, 3, H, W), labels (B,)), B = ``--batch-size``, with the training transform set on
    ``dataset``; this process's share of an epoch-seeded permutation, incomplete last batch dropped."""
    if args.aa and allow_zero_bit_posterize():
        _logger.info('patched timm RandAugment posterize for 0 bits (refused by this Pillow version)')
    dataset.transform = create_transform(
        data_config['input_size'], is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio),
        hflip=args.hflip, color_jitter=args.color_jitter, auto_augment=args.aa or None,
        interpolation=args.train_interpolation, mean=data_config['mean'], std=data_config['std'],
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
    if args.distributed and args.aug_repeats > 0:
        sampler = RepeatAugSampler(dataset, num_replicas=args.world_size, rank=args.rank, shuffle=True,
                                   num_repeats=args.aug_repeats)
    else:
        # also without a process group: a fixed, epoch-seeded permutation makes the order reproducible on resume
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=args.world_size, rank=args.rank, shuffle=True, seed=args.seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=ResumableSampler(sampler), num_workers=args.workers,
        pin_memory=pin_memory, drop_last=True, persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(args.seed + args.rank))


def create_val_loader(args: argparse.Namespace, data_config: dict, pin_memory: bool,
                      train_classes: dict[str, int]) -> torch.utils.data.DataLoader:
    """The ``--val-split`` loader of this process (eval transform, in order); refuses class folders that differ
    from ``train_classes`` (folder name -> label) unless a ``--class-map`` fixes the labels."""
    loader = create_eval_loader(
        args.data_dir, args.val_split, data_config, args.validation_batch_size or args.batch_size,
        args.workers, class_map=args.class_map, rank=args.rank, world_size=args.world_size, pin_memory=pin_memory)
    val_set = loader.dataset
    val_set = val_set.dataset if isinstance(val_set, torch.utils.data.Subset) else val_set
    val_classes = getattr(val_set.reader, 'class_to_idx', None)
    if not args.class_map and train_classes and val_classes != train_classes:
        raise ValueError(f'the class folders of {args.val_split} and {args.train_split} differ; labels '
                         'would not match (pass --class-map)')
    return loader
