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
import os
import os.path as osp

from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from vim.mm.compat import trusted_mmengine_checkpoints


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='config file')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default: work_dirs/<config name>)')
    parser.add_argument('--resume', nargs='?', const='auto', default=None,
                        help='resume from PATH, or from the latest checkpoint of the work dir if no PATH is given')
    parser.add_argument('--amp', action='store_true',
                        help='bf16 mixed precision: the whole model (AmpOptimWrapper) for mmseg; the backbone only for '
                             "mmdet, whose anchors, boxes and mmcv RoI ops must stay fp32")
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help="scale the lr by the actual total batch over the config's auto_scale_lr.base_batch_size")
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, key=value (e.g. model.backbone.with_cp=True)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help="'pytorch' under torchrun")
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def build_config(args: argparse.Namespace) -> Config:
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
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
    cfg = build_config(parse_args(argv))
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    with trusted_mmengine_checkpoints():  # mmengine 0.10's own checkpoints need a full unpickle on torch >= 2.6
        runner.train()
    return runner


if __name__ == '__main__':
    main()
