#!/usr/bin/env python3
"""Evaluate a timm image classifier on an ImageFolder split: top-1, top-5, loss and throughput.

    python tools/validate.py /data/imagenet --model vim_tiny_patch16_224.in1k --pretrained
    python tools/validate.py /data/imagenet --model vim_tiny_patch16_224 --checkpoint vim_t_midclstok_76p1acc.pth
    python tools/validate.py /data/imagenet --model vim_tiny_patch16_224 \\
        --checkpoint outputs/train/vim_tiny_patch16_224/best_ema.safetensors --json results.json
    python tools/validate.py /data/imagenet --model vim_small_patch16_stride8_224.in1k --pretrained --img-size 320

``data`` is a folder with one sub-folder per class, or a root holding such a folder named by ``--split`` (val).
Weights: ``--pretrained`` (the model's hub tag), or ``--checkpoint``: an official hustvl/Vim .pth, a state dict, a
safetensors file, or a training state written by tools/train.py (its 'model' entry). The class count is read from
the checkpoint's classifier unless ``--num-classes`` is given. Preprocessing comes from the model's pretrained config
(resolve_data_config + create_transform), overridden by ``--img-size`` / ``--crop-pct`` / ``--interpolation``.

Reported: top1 and top5 in percent (top5 is top-min(5, classes)), the mean cross-entropy loss, img/s end to end
(data loading included) and img/s of the model alone (forward passes, device-synchronised).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import create_dataset, create_transform, resolve_data_config
from timm.utils import accuracy

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import vim  # noqa: E402,F401  (registers the Vim models with timm)
from vim.models import load_checkpoint_file  # noqa: E402

_logger = logging.getLogger('vim.validate')
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('data', help='ImageFolder root (with a --split sub-folder) or the split folder itself')
    p.add_argument('--split', default='val', help='sub-folder of data to evaluate (default: %(default)s)')
    p.add_argument('--class-map', default='', help='file mapping folder names to class indices (timm format)')
    p.add_argument('--model', default='vim_tiny_patch16_224', help='timm model name[.tag] (default: %(default)s)')
    weights = p.add_mutually_exclusive_group()
    weights.add_argument('--pretrained', action='store_true', help="the model tag's pretrained weights")
    weights.add_argument('--checkpoint', default='', help='weights file (.pth/.pt/.bin/.safetensors)')
    p.add_argument('--num-classes', type=int, default=None, help="classifier size (default: the checkpoint's)")
    p.add_argument('--img-size', type=int, default=None, help='input size (default: the model config)')
    p.add_argument('--crop-pct', type=float, default=None, help='center-crop fraction (default: the model config)')
    p.add_argument('--interpolation', default='', help='resize interpolation (default: the model config)')
    p.add_argument('--batch-size', '-b', type=int, default=256, help='(default: %(default)s)')
    p.add_argument('--workers', '-j', type=int, default=4, help='data loading processes (default: %(default)s)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--amp', action='store_true', help='autocast the forward (CUDA; fp32 otherwise)')
    p.add_argument('--amp-dtype', choices=sorted(AMP_DTYPES), default='bf16', help='(default: %(default)s)')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--log-interval', type=int, default=50, help='batches between progress lines (0: none)')
    p.add_argument('--json', default='', metavar='PATH', help="write the results as JSON to PATH ('-': stdout)")
    return p.parse_args(argv)


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


def create_eval_loader(
        root: str | Path,
        split: str,
        data_config: dict,
        batch_size: int,
        workers: int,
        class_map: str = '',
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """A deterministic loader over ``root/split`` with timm's eval transform; with ``world_size`` > 1 each rank
    gets a contiguous, unpadded share so that summed counts are exact."""
    dataset = create_dataset('', root=str(root), split=split, class_map=class_map or None, is_training=False)
    dataset.transform = create_transform(**data_config, is_training=False)
    if world_size > 1:
        per_rank = -(-len(dataset) // world_size)
        dataset = torch.utils.data.Subset(
            dataset, range(rank * per_rank, min(len(dataset), (rank + 1) * per_rank)))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory,
        drop_last=False, generator=torch.Generator(), persistent_workers=False)


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(
        model: torch.nn.Module,
        loader: torch.utils.data.DataLoader,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        distributed: bool = False,
        channels_last: bool = False,
        log_interval: int = 0,
        logger: logging.Logger = _logger,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%), mean cross-entropy and throughput of ``model`` over ``loader``.

    Counts are summed over ranks when ``distributed`` (each rank evaluating its own share of the data).
    """
    was_training = model.training
    model.eval()
    num_classes = getattr(model, 'num_classes', None)
    totals = torch.zeros(4, dtype=torch.float64)  # images, top-1 correct, top-k correct, summed loss
    model_time = 0.0
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    start = time.perf_counter()
    for i, (images, targets) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        _synchronize(device)
        t0 = time.perf_counter()
        with amp:
            logits = model(images)
        _synchronize(device)
        model_time += time.perf_counter() - t0
        logits = logits.float()
        if num_classes is None:
            num_classes = logits.shape[-1]
        top1, topk = accuracy(logits, targets, topk=(1, min(5, logits.shape[-1])))
        n = images.shape[0]
        # timm's accuracy returns percentages of this batch; turn them back into exact counts
        totals += torch.tensor([n, round(top1.item() * n / 100), round(topk.item() * n / 100),
                                F.cross_entropy(logits, targets, reduction='sum').item()], dtype=torch.float64)
        if log_interval and (i + 1) % log_interval == 0:
            logger.info(f'eval [{i + 1}/{len(loader)}] top1 {100 * totals[1] / totals[0]:.3f} '
                        f'img/s {totals[0] / (time.perf_counter() - start):.1f}')
    elapsed = time.perf_counter() - start
    if distributed:
        reduced = totals.to(device)
        dist.all_reduce(reduced)
        totals = reduced.cpu()
        times = torch.tensor([elapsed, model_time], dtype=torch.float64, device=device)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        elapsed, model_time = times.tolist()
    model.train(was_training)
    count = int(totals[0])
    if count == 0:
        raise ValueError('the evaluation set is empty')
    return {
        'top1': 100.0 * totals[1].item() / count,
        'top5': 100.0 * totals[2].item() / count,
        'loss': totals[3].item() / count,
        'num_images': count,
        'num_classes': int(num_classes),
        'img_per_sec': count / max(elapsed, 1e-9),
        'model_img_per_sec': count / max(model_time, 1e-9),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation described by ``argv`` (see ``--help``); returns the results dict."""
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format='%(message)s')
    _logger.setLevel(logging.INFO)
    device = torch.device(args.device)
    model = create_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                         num_classes=args.num_classes, img_size=args.img_size)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    data_config = resolve_data_config(
        dict(img_size=args.img_size, crop_pct=args.crop_pct, interpolation=args.interpolation), model=model)
    loader = create_eval_loader(args.data, args.split, data_config, args.batch_size, args.workers,
                                class_map=args.class_map, pin_memory=device.type == 'cuda')
    dataset = loader.dataset
    num_dataset_classes = len(dataset.reader.class_to_idx) if hasattr(dataset.reader, 'class_to_idx') else None
    if num_dataset_classes and num_dataset_classes > model.num_classes:
        raise ValueError(f'the dataset has {num_dataset_classes} classes but the model predicts '
                         f'{model.num_classes}; pass --num-classes or a matching checkpoint')
    amp_dtype = AMP_DTYPES[args.amp_dtype] if args.amp and device.type == 'cuda' else None
    _logger.info(f'{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, '
                 f'{len(dataset)} images, data config {data_config}, '
                 f'{"autocast " + args.amp_dtype if amp_dtype else "fp32"}')
    results = evaluate(model, loader, device, amp_dtype=amp_dtype, channels_last=args.channels_last,
                       log_interval=args.log_interval)
    results.update(model=args.model, checkpoint=str(args.checkpoint) if args.checkpoint else None,
                   pretrained=args.pretrained, input_size=list(data_config['input_size']),
                   crop_pct=data_config['crop_pct'], interpolation=data_config['interpolation'],
                   amp=args.amp_dtype if amp_dtype else None, batch_size=args.batch_size, device=str(device))
    _logger.info(f"top1 {results['top1']:.3f}  top5 {results['top5']:.3f}  loss {results['loss']:.4f}  "
                 f"{results['img_per_sec']:.1f} img/s ({results['model_img_per_sec']:.1f} img/s model only)")
    if args.json:
        text = json.dumps(results, indent=2)
        if args.json == '-':
            print(text)
        else:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text + '\n')
    return results


if __name__ == '__main__':
    main()
