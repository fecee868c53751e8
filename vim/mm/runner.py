"""What tools/train_mm.py and tools/test_mm.py share: the common command-line options and the Runner set-up."""
from __future__ import annotations

import argparse
import os
import os.path as osp
from typing import Literal

from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from .compat import trusted_mmengine_checkpoints

__all__ = ['add_common_args', 'load_config', 'run']


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--work-dir, --cfg-options, --launcher (and torch.distributed.launch's --local-rank)."""
    parser.add_argument('--work-dir', help='where logs and outputs go (default: work_dirs/<config name>)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, key=value (e.g. model.backbone.with_cp=True)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help="'pytorch' under torchrun")
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)


def load_config(args: argparse.Namespace) -> Config:
    """The config file with the launcher, ``--cfg-options`` and the work dir applied."""
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


def run(cfg: Config, mode: Literal['train', 'test']) -> Runner:
    """Build the config's Runner and train or test with it."""
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    with trusted_mmengine_checkpoints():  # mmengine 0.10's own checkpoints need a full unpickle on torch >= 2.6
        runner.train() if mode == 'train' else runner.test()
    return runner
