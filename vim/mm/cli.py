"""The ``vim-train-mm`` and ``vim-test-mm`` commands (also ``tools/train_mm.py`` and ``tools/test_mm.py``):
train or evaluate a detector or segmentor from an mmdet / mmseg config with mmengine's Runner.

Training, one GPU::

    vim-train-mm configs/mmseg/upernet_vim-tiny_4xb4-160k_ade20k-512x512.py --amp --data-root DIR

Several GPUs or nodes, through torchrun (per-GPU batch from the config; the name's "4xb4" is 4 GPUs x 4)::

    torchrun --nproc-per-node 4 --no-python vim-train-mm CONFIG --launcher pytorch
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 8 tools/train_mm.py CONFIG --launcher pytorch

Resume the latest checkpoint of the work dir with ``--resume`` (or a given one with ``--resume PATH``).

Evaluation::

    vim-test-mm CONFIG CHECKPOINT [--work-dir DIR] [--out results.pkl]
    torchrun --nproc-per-node 4 tools/test_mm.py CONFIG CHECKPOINT --launcher pytorch

Both take ``--data-root DIR`` (every dataset and the evaluators' annotation files; :func:`vim.mm.config.set_data_root`)
and ``--img-size N`` (the backbone, pipelines, pads, crops and sliding window together;
:func:`vim.mm.config.set_img_size`). The config is built as: the file, then ``--data-root``, then ``--img-size``, then
``--cfg-options`` (the most specific wins), then the tool's own options. Argument parsing needs only the standard
library, so ``--help`` works without the OpenMMLab stack.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from .config import set_data_root, set_img_size

if TYPE_CHECKING:
    from mmengine.config import Config
    from mmengine.runner import Runner

__all__ = [
    'train_main', 'test_main', 'train_parser', 'test_parser', 'load_config', 'build_train_config', 'build_test_config',
    'run',
]

TRAIN_DESCRIPTION = ("Train a detector or segmentor from an mmdet / mmseg config (configs/mmdet, configs/mmseg) with "
                     "mmengine's Runner.")
TEST_DESCRIPTION = ('Evaluate a trained detector or segmentor (mmdet / mmseg config + checkpoint) with '
                    "mmengine's Runner.")
_MM_STACK = ("the OpenMMLab stack (mmengine 0.10.7, mmcv 2.1.0, mmdet 3.3.0 / mmseg 1.2.2): `make install-mm` in a "
             "checkout (builds mmcv once), or `pip install 'vim-backbones[mm]'` with mmcv 2.1.0 built for your torch")
# Variables an mmengine config has already copied into other keys when it is read: overriding them does nothing.
_RESOLVED_VARIABLES = {'data_root': '--data-root', 'image_size': '--img-size', 'crop_size': '--img-size'}


def _require_mm() -> None:
    try:
        import mmengine  # noqa: F401
    except ImportError as e:
        raise SystemExit(f'{osp.basename(sys.argv[0])}: this command needs {_MM_STACK} ({e})') from None


class _CfgOptions(argparse.Action):
    """mmengine's ``DictAction`` (key=value pairs, values parsed as python literals), imported when used."""

    def __call__(self, parser, namespace, values, option_string=None):
        _require_mm()
        from mmengine.config import DictAction

        DictAction(self.option_strings, self.dest)(parser, namespace, values, option_string)


def _add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--data-root',
                        help="dataset root: sets data_root of every dataset of the train/val/test dataloaders (also "
                             "inside RepeatDataset) and moves the evaluators' ann_file along; the layout below it is "
                             "the config's (COCO: annotations/, train2017/, val2017/; ADE20k: images/, "
                             "annotations/)")
    parser.add_argument('--img-size', type=int,
                        help='square training/test resolution: the backbone img_size (pretrained pos_embed resampled '
                             "to it), the data preprocessor's size and pads, pipeline resize/crop sizes and the "
                             "sliding-window crop and stride, all scaled from the config's size")
    parser.add_argument('--work-dir', help='where logs and outputs go (default: work_dirs/<config name>)')
    parser.add_argument('--cfg-options', nargs='+', action=_CfgOptions,
                        help='override config entries, key=value (e.g. model.backbone.with_cp=True)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help="'pytorch' under torchrun")
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=TRAIN_DESCRIPTION)
    parser.add_argument('config', help='config file')
    parser.add_argument('--resume', nargs='?', const='auto', default=None,
                        help='resume from PATH, or from the latest checkpoint of the work dir if no PATH is given')
    parser.add_argument('--amp', action='store_true',
                        help='bf16 mixed precision: the whole model (AmpOptimWrapper) for mmseg; the backbone only for '
                             "mmdet, whose anchors, boxes and mmcv RoI ops must stay fp32")
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help="scale the lr by the actual total batch over the config's auto_scale_lr.base_batch_size")
    _add_common_args(parser)
    return parser


def test_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=TEST_DESCRIPTION)
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', help='also dump the raw predictions to this pickle file')
    _add_common_args(parser)
    return parser


def load_config(args: argparse.Namespace) -> Config:
    """The config file with ``--data-root``, ``--img-size``, ``--cfg-options``, the launcher and the work dir."""
    _require_mm()
    from mmengine.config import Config
    from mmengine.logging import print_log

    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    resolved = sorted(k for k in (args.cfg_options or {}) if k in _RESOLVED_VARIABLES)
    if resolved:
        raise ValueError(
            f'--cfg-options {", ".join(resolved)}=... would change nothing: the config copied these variables into '
            f'other keys when it was read. Use {", ".join(sorted({_RESOLVED_VARIABLES[k] for k in resolved}))}.')
    cfg = Config.fromfile(args.config)
    if args.data_root is not None:
        keys = set_data_root(cfg, args.data_root)
        print_log(f'--data-root {args.data_root}: set {", ".join(keys)}', logger='current')
    if args.img_size is not None:
        keys = set_img_size(cfg, args.img_size)
        print_log(f'--img-size {args.img_size}: scaled {", ".join(keys)}', logger='current')
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


def build_train_config(args: argparse.Namespace) -> Config:
    """The training config: :func:`load_config`, then ``--amp``, ``--auto-scale-lr`` and ``--resume``."""
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


def build_test_config(args: argparse.Namespace) -> Config:
    """The evaluation config: :func:`load_config`, the checkpoint as ``load_from``, ``--out``."""
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


def run(cfg: Config, mode: Literal['train', 'test']) -> Runner:
    """Build the config's Runner and train or test with it."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    from .compat import trusted_mmengine_checkpoints

    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    with trusted_mmengine_checkpoints():  # mmengine 0.10's own checkpoints need a full unpickle on torch >= 2.6
        runner.train() if mode == 'train' else runner.test()
    return runner


def train_main(argv: Sequence[str] | None = None) -> None:
    """``vim-train-mm``: parse ``argv`` (default ``sys.argv[1:]``), build the config, train. Returns None (a console
    script exits with what its function returns); for the Runner, call :func:`run` on :func:`build_train_config`."""
    run(build_train_config(train_parser().parse_args(argv)), 'train')


def test_main(argv: Sequence[str] | None = None) -> None:
    """``vim-test-mm``: parse ``argv`` (default ``sys.argv[1:]``), build the config, test."""
    run(build_test_config(test_parser().parse_args(argv)), 'test')
