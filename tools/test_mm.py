#!/usr/bin/env python
"""Evaluate a trained detector or segmentor (mmdet / mmseg config + checkpoint) with mmengine's Runner.

    python tools/test_mm.py CONFIG CHECKPOINT [--work-dir DIR] [--out results.pkl]
    torchrun --nproc-per-node 4 tools/test_mm.py CONFIG CHECKPOINT --launcher pytorch
"""
from __future__ import annotations

import argparse

from mmengine.config import Config
from mmengine.runner import Runner

from vim.mm.runner import add_common_args, load_config, run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', help='also dump the raw predictions to this pickle file')
    add_common_args(parser)
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    cfg = load_config(args)
    cfg.load_from = args.checkpoint
    # The backbone weights come from the checkpoint: do not fetch the ImageNet ones first.
    if cfg.model.get('backbone', {}).get('init_cfg') is not None:
        cfg.model.backbone.init_cfg = None
    if args.out is not None:
        cfg.test_evaluator = [cfg.test_evaluator] if isinstance(cfg.test_evaluator, dict) else list(
            cfg.test_evaluator)
        cfg.test_evaluator.append(dict(type='DumpResults', out_file_path=args.out))
    return cfg


def main(argv=None) -> Runner:
    return run(build_config(parse_args(argv)), 'test')


if __name__ == '__main__':
    main()
