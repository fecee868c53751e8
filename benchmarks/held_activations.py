"""What autograd holds between forward and backward for one training step, with and without ``scan_recompute``, on
any machine: the bytes of the distinct storages saved for the backward (saved-tensor hooks), per image.

    python benchmarks/held_activations.py [--models M ...] [--backends cpu reference] [--img-size 224]

CPU, bf16 autocast by default (as GPU training runs), all models and backends in one process. This counts what the
backward keeps, not a GPU's peak (which adds the weights, the optimizer state and the backward's own buffers).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform

import timm
import torch

import vim  # noqa: F401  (registers the models)
from vim.layers import uses_scan


def held_bytes(model: torch.nn.Module, x: torch.Tensor, amp: bool) -> int:
    """Bytes of the distinct storages autograd saves in ``model(x)`` (each counted once, as memory is)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        model(x)
    return sum(storages.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', default=['vim_tiny_patch16_224', 'deit_tiny_patch16_224'])
    p.add_argument('--backends', nargs='+', default=['cpu', 'reference'], help="Vim's scan backends")
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--batch-size', type=int, default=2)
    p.add_argument('--fp32', action='store_true', help='no bf16 autocast')
    args = p.parse_args(argv)
    amp = not args.fp32
    print(f'{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, '
          f'torch {torch.__version__}, {"bf16 autocast" if amp else "fp32"}, {args.img_size}px, batch '
          f'{args.batch_size}: MB held for the backward per image')
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    for name in args.models:
        model = timm.create_model(name, img_size=args.img_size, drop_path_rate=0.0).train()
        if not uses_scan(model):
            print(f'{name:28s} {held_bytes(model, x, amp) / args.batch_size / 1e6:8.1f}')
            continue
        for backend in args.backends:
            os.environ['VIM_SCAN_BACKEND'] = backend
            figures = []
            for recompute in (False, True):
                model.set_scan_recompute(recompute)
                figures.append(held_bytes(model, x, amp) / args.batch_size / 1e6)
            print(f'{name:28s} {figures[0]:8.1f}, with scan_recompute {figures[1]:8.1f} ({backend} backend)')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
