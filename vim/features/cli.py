"""Extract Vim features from images at any resolution: pooled embeddings and, on request, patch-feature maps.

    vim-extract-features                            # assets/images, Vim-Ti, 512² on CPU / 1248² on CUDA
    vim-extract-features photos/ --img-size 1248 832 --layers 5 11 17 23 --vis
    vim-extract-features list.txt --native --max-size 1024 --checkpoint vim_t_midclstok_76p1acc.pth
    vim-extract-features 'shards/*.tar' --dtype bf16 --batch-size 64          # WebDataset-style tars, streamed
    vim-extract-features photos/ --img-size 224 --dtype bf16 --batch-size 64 --torchcompile   # torch.compile
    torchrun --nproc_per_node 8 -m vim.features.cli photos/ --output out     # one rank per GPU (or nodes)

Output folder (--output, default outputs/features/<model>), readable without this package:
    img_emb/img_emb_NNNNNN.npy       pooled embeddings (rows, C), float32, ~1,000 images per shard
    layer_I/layer_I_NNNNNN.npy       (--layers) patch features, token-major (sum of h*w over rows, C)
    metadata/metadata_NNNNNN.parquet key (absolute path or <tar>/<member>), row, input and grid sizes,
                                     token_offset (first row of the image in layer_I), vis
    failures/*.jsonl, meta.json (settings), vis/*.png (--vis: the input beside a PCA of the last layer asked)
In Python: vim.features.load_features(output, image), vim.features.iter_features(output, framework='torch').
Every batch is committed as it is done; rerunning the same command (with any number of processes) skips what is
there, also after kill -9. Exit status: 0 all done, 1 some images failed, 130 interrupted (rerun to resume).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from pathlib import Path

from ..utils import add_compile_arguments, retain_freed_memory
from .extractor import DTYPES, Extractor
from .layout import FeatureError

__all__ = ['main', 'parse_args']

ASSETS = Path(__file__).resolve().parents[2] / 'assets' / 'images'  # the bundled photos (in a checkout)


def _bytes(text: str) -> int:
    m = re.fullmatch(r'(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?', text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f'{text!r} is not a size (e.g. 1G, 500M, 4096)')
    return int(float(m[1]) * 1024 ** ' KMGT'.index(m[2].upper() or ' '))


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    p = argparse.ArgumentParser(prog='vim-extract-features', description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('inputs', nargs='*', help='image files, folders (searched recursively), globs, .txt files\n'
                   'listing one path per line (relative to the list), and .tar shards. Default: assets/images')
    p.add_argument('--model', default='vim_tiny_patch16_224', help='timm model name (default: %(default)s)')
    size = p.add_mutually_exclusive_group()
    size.add_argument('--img-size', type=int, nargs='+', metavar='N', help='input size N (square) or H W, rounded '
                      'to what the patch stride tiles;\nthe whole image is resized to it (no crop). '
                      'Default: 1248 on CUDA, 512 on CPU')
    size.add_argument('--native', action='store_true', help='each image at its own size, rounded to the stride;\n'
                      'batches hold images of one size')
    p.add_argument('--max-size', type=int, default=1248, help='--native: cap on the longer side (default: 1248)')
    p.add_argument('--batch-size', type=int, help='images per batch. Default: 8 on CUDA, 1 on CPU')
    p.add_argument('--layers', type=int, nargs='+', default=[], metavar='I',
                   help='also save patch-feature maps (C, h, w) of these blocks (negative: from the end)')
    p.add_argument('--output', type=Path, help='output folder (default: outputs/features/<model>)')
    p.add_argument('--shard-images', type=int, default=1000, help='images per shard (default: %(default)s)')
    p.add_argument('--shard-bytes', type=_bytes, default=2**30, help='or bytes of features per shard, '
                   'whichever comes first (default: 1G)')
    p.add_argument('--vis', action='store_true', help='write vis/<image>.png: input | PCA of the last layer asked')
    p.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=True,
                   help='load pretrained weights; falls back to random init if they cannot be had (default: on)')
    p.add_argument('--checkpoint', type=Path, help='local weights: official .pth, state dict or .safetensors')
    p.add_argument('--device', help='default: cuda (cuda:LOCAL_RANK under torchrun) if available, else cpu')
    p.add_argument('--dtype', choices=tuple(DTYPES), default='fp32', help='autocast dtype (default: fp32)')
    p.add_argument('--num-workers', type=int, help='image-decoding processes (default: min(8, CPUs) on CUDA, '
                   '0 on CPU)')
    p.add_argument('--window', type=int, default=20, help='steady-state speed over the last N batches '
                   '(default: %(default)s)')
    p.add_argument('--fsync', action=argparse.BooleanOptionalAction, default=True,
                   help='fsync every batch commit, to survive a power cut too (default: on)')
    p.add_argument('--quiet', action='store_true', help='no progress bar')
    add_compile_arguments(p)
    args = p.parse_args(argv)
    if args.img_size is not None and len(args.img_size) not in (1, 2):
        p.error('--img-size takes one (square) or two (H W) numbers')
    if args.batch_size is not None and args.batch_size < 1:
        p.error('--batch-size must be at least 1')
    if args.checkpoint is not None and not args.checkpoint.is_file():
        p.error(f'--checkpoint {args.checkpoint} is not a file')
    return args, p


def run(args: argparse.Namespace) -> dict:
    """Build the extractor from parsed arguments and run it; returns its summary."""
    extractor = Extractor(
        args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, img_size=args.img_size,
        native=args.native, max_size=args.max_size, layers=args.layers, device=args.device, dtype=args.dtype,
        batch_size=args.batch_size, num_workers=args.num_workers, vis=args.vis, shard_images=args.shard_images,
        shard_bytes=args.shard_bytes, window=args.window, durable=args.fsync, progress=not args.quiet,
        torchcompile=args.torchcompile, torchcompile_mode=args.torchcompile_mode)
    if extractor.device.type == 'cpu':
        retain_freed_memory()  # this process is ours: reuse freed activations instead of faulting in new pages
    return extractor.run(args.inputs or [ASSETS], args.output)


def print_summary(s: dict) -> None:
    weights = s['weights'] + (f': {s["weights_note"]}' if s['weights_note'] else '')
    print(f'\nweights: {weights}')
    print(f'images: {s["done"]} done, {s["skipped"]} skipped (already done), {len(s["failed"])} failed')
    for key, why in s['failed'].items():
        print(f'  failed: {key}: {why}')
    ranks = f' over {s["world_size"]} ranks' if s['world_size'] > 1 else ''
    print(f'speed: {s["img_per_s"]:.2f} img/s average, {s["steady_img_per_s"]:.2f} img/s over the last '
          f'{s["window"]} batches{ranks} ({s["done"]} images in {s["seconds"]:.1f} s; {s["wall"]:.1f} s in all, '
          f'{s["scan_seconds"]:.1f} s of it finding the images and what is done)')
    print(f'peak memory: {s["peak_memory_mib"]:.0f} MiB ({s["peak_memory_what"]}, {s["device"]})')
    print(f'output: {s["output"]} ({len(s["shards"])} shard{"s" * (len(s["shards"]) != 1)} written)')


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; 0: all images done, 1: some failed, 130: interrupted (rerun to resume)."""
    args, parser = parse_args(argv)
    previous = None
    try:  # a plain `kill` (SIGTERM) ends like Ctrl-C: the open shard is sealed, nothing committed is lost
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:  # not the main thread
        pass
    try:
        s = run(args)
    except FeatureError as e:
        parser.error(str(e))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if int(os.environ.get('RANK', '0')) == 0:
        print_summary(s)
    if s['interrupted']:
        print('INTERRUPTED: every committed batch is in the output; rerun the same command to resume.')
        return 130
    return 1 if s['failed'] else 0


if __name__ == '__main__':
    sys.exit(main())
