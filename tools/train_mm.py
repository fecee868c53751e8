#!/usr/bin/env python
"""Train a detector or segmentor from an mmdet / mmseg config (configs/mmdet, configs/mmseg) with mmengine's Runner.

One GPU::

    python tools/train_mm.py configs/mmseg/upernet_vim-tiny_4xb4-160k_ade20k-512x512.py --amp

Several GPUs or nodes, through torchrun (per-GPU batch from the config; the name's "4xb4" is 4 GPUs x 4)::

    torchrun --nproc-per-node 4 tools/train_mm.py CONFIG --launcher pytorch
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 8 tools/train_mm.py CONFIG --launcher pytorch

Resume the latest checkpoint of the work dir with ``--resume`` (or a given one with ``--resume PATH``).
"""
from __future__ import annotations

import argparse

from mmengine.config import Config
from mmengine.runner import Runner

from vim.mm.runner import add_common_args, load_config, run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='config file')
    parser.add_argument('--resume', nargs='?', const='auto', default=None,
                        help='resume from PATH, or from the latest checkpoint of the work dir if no PATH is given')
    parser.add_argument('--amp', action='store_true',
                        help='bf16 mixed precision: the whole model (AmpOptimWrapper) for mmseg; the backbone only for '
                             "mmdet, whose anchors, boxes and mmcv RoI ops must stay fp32")
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help="scale the lr by the actual total batch over the config's auto_scale_lr.base_batch_size")
    add_common_args(parser)
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    cfg = load_config(args)
    if args.amp:
        if cfg.get('default_scope') == 'mmdet':
            cfg.model.backbone.autocast_dtype = 'bfloat16'
        else:
            if cfg.optim_wrapper.get('type', 'OptimWrapper') != 'OptimWrapper':
                raise ValueError(f'--amp needs optim_wrapper.type OptimWrapper, not {cfg.optim_wrapper.type}')
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.dtype = 'bfloat16'
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise ValueError('--auto-scale-lr needs auto_scale_lr.base_batch_size in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    return cfg


def main(argv=None) -> Runner:
    return run(build_config(parse_args(argv)), 'train')


if __name__ == '__main__':
    main()
