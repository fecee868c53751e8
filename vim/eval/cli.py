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
import json
import logging
from pathlib import Path

import torch
from timm.data import resolve_data_config

from vim.eval.loop import create_eval_loader, evaluate
from vim.eval.model import create_model
from vim.layers import uses_scan
from vim.utils import add_compile_arguments, maybe_compile

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
    add_compile_arguments(p)
    p.add_argument('--log-interval', type=int, default=50, help='batches between progress lines (0: none)')
    p.add_argument('--json', default='', metavar='PATH', help="write the results as JSON to PATH ('-': stdout)")
    return p.parse_args(argv)


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
    amp_dtype = AMP_DTYPES[args.amp_dtype] if args.amp and device.type == 'cuda' else None
    forward = maybe_compile(model, args.torchcompile, args.torchcompile_mode,
                            device=device if uses_scan(model) else None, dtype=amp_dtype)
    data_config = resolve_data_config(
        dict(img_size=args.img_size, crop_pct=args.crop_pct, interpolation=args.interpolation), model=model)
    loader = create_eval_loader(args.data, args.split, data_config, args.batch_size, args.workers,
                                class_map=args.class_map, pin_memory=device.type == 'cuda')
    dataset = loader.dataset
    num_dataset_classes = len(dataset.reader.class_to_idx) if hasattr(dataset.reader, 'class_to_idx') else None
    if num_dataset_classes and num_dataset_classes > model.num_classes:
        raise ValueError(f'the dataset has {num_dataset_classes} classes but the model predicts '
                         f'{model.num_classes}; pass --num-classes or a matching checkpoint')
    _logger.info(f'{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, '
                 f'{len(dataset)} images, data config {data_config}, '
                 f'{"autocast " + args.amp_dtype if amp_dtype else "fp32"}')
    results = evaluate(forward, loader, device,
                       amp_dtype=amp_dtype, channels_last=args.channels_last, log_interval=args.log_interval)
    results.update(model=args.model, checkpoint=str(args.checkpoint) if args.checkpoint else None,
                   pretrained=args.pretrained, input_size=list(data_config['input_size']),
                   crop_pct=data_config['crop_pct'], interpolation=data_config['interpolation'],
                   amp=args.amp_dtype if amp_dtype else None, batch_size=args.batch_size, device=str(device),
                   torchcompile=args.torchcompile)
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


def command(argv: list[str] | None = None) -> int:
    """The ``vim-validate`` command (``tools/validate.py``): ``main`` with the process exit status."""
    main(argv)
    return 0
