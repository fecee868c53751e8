"""Convert an official hustvl/Vim checkpoint (or any file ``load_checkpoint_file`` reads) to safetensors.

    python tools/convert_checkpoint.py vim_t_midclstok_76p1acc.pth vim_tiny.safetensors --model vim_tiny_patch16_224

The weights are converted to this library's names, checked by loading them strictly into ``--model`` (which
also resamples pos_embed if ``--img-size`` differs from the checkpoint's), and written atomically.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
from safetensors.torch import save_file

from vim.models import CheckpointError, load_checkpoint_file
from vim.utils import atomic_write


def convert(src: Path, dst: Path, model_name: str, img_size: int | None = None) -> dict:
    """Load ``src`` into ``model_name`` (strictly) and write its state dict to ``dst`` as safetensors."""
    kwargs = dict(img_size=img_size) if img_size else {}
    num_classes = load_checkpoint_file(src).get('head.weight')
    if num_classes is not None:
        kwargs['num_classes'] = num_classes.shape[0]
    model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(src)), **kwargs)
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    metadata = {'model': model_name, 'source': src.name, 'img_size': json.dumps(model.patch_embed.img_size)}
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dst, lambda tmp: save_file(state_dict, str(tmp), metadata=metadata))
    return metadata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', type=Path, help='official .pth training checkpoint, state dict or safetensors file')
    parser.add_argument('dst', type=Path, help='output .safetensors file')
    parser.add_argument('--model', default='vim_tiny_patch16_224', help='registered model the weights belong to')
    parser.add_argument('--img-size', type=int, default=None, help='resample pos_embed to this input size')
    args = parser.parse_args(argv)
    if args.dst.suffix != '.safetensors':
        parser.error('dst must end in .safetensors')
    if args.model not in timm.list_models('*vim*'):
        parser.error(f'unknown model {args.model!r}; choose from {", ".join(timm.list_models("*vim*"))}')
    try:
        meta = convert(args.src, args.dst, args.model, args.img_size)
    except (CheckpointError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(f'wrote {args.dst} ({meta["model"]}, img_size {meta["img_size"]}) from {args.src}')
    return 0
