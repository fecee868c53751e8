"""ImageNet-style classification training with the official Vim (DeiT) recipe, on timm's building blocks.

    python tools/train.py /data/imagenet --config vim_tiny_patch16_224                    # one process
    torchrun --nproc_per_node 8 tools/train.py /data/imagenet --config vim_small_patch16_224
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        tools/train.py /data/imagenet --config vim_base_patch16_224
    torchrun --nproc_per_node 8 tools/train.py /data/imagenet --config vim_tiny_patch16_stride8_224_ft \\
        --initial-checkpoint outputs/train/vim_tiny_patch16_224/best_ema.safetensors
    python tools/train.py /data/imagenet --config vim_tiny_patch16_224 --resume          # continue a run

Data: an ImageFolder root with train/ and val/ (one sub-folder per class). ``--config`` takes a YAML preset (a
path, or a name from configs/imagenet/) whose keys are the option names below with underscores; options given on
the command line win. ``--batch-size`` is per process; unless ``--lr`` is given the learning rate is
``--lr-base * global batch / --lr-base-size`` as in the official scripts.

Precision: bf16 autocast on CUDA by default, fp32 on CPU (``--amp-dtype``). Each step's loss and gradient norm are
checked (agreed across processes); a non-finite one skips the optimizer and EMA update, is logged with its step, and
``--max-nonfinite`` consecutive ones stop the run with an error.

Output folder (``--output``, default outputs/train/<config or model>):
    last.safetensors, last_ema.safetensors        weights at the latest save (model, EMA)
    best.safetensors, best_ema.safetensors        weights of the best validation top-1 (model, EMA)
    last_state.pth     everything to continue: weights, EMA, optimizer, scheduler, grad scaler, epoch and step, RNG
                       states of every process, the arguments. Plain tensors and containers only, so it loads with
                       torch.load(weights_only=True) and with vim.models.load_checkpoint_file (its 'model').
    metrics.jsonl      one line per epoch; train.log the log; args.yaml the resolved arguments.
Every file is written under a temporary name and renamed into place. The state is saved every
``--save-every-steps`` updates and at the end of every epoch; SIGTERM saves at the next step and exits.
``--resume`` (no value: <output>/last_state.pth when it exists) continues at the saved step of the saved epoch.
With ``--workers 0`` a resumed run is bit-identical to an uninterrupted one on CPU; with worker processes the
images and their order are the same but the random augmentations of the interrupted epoch's remaining batches are
drawn from freshly seeded workers.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from timm.utils import init_distributed_device

from vim.train.data import allow_zero_bit_posterize
from vim.train.state import STATE_FILE, load_training_state, to_builtins
from vim.train.trainer import AMP_DTYPES, NonFiniteLossError, Trainer
from vim.utils import add_compile_arguments

# the command's interface to callers and tests, some of it defined in the sibling modules
__all__ = ['NonFiniteLossError', 'Trainer', 'allow_zero_bit_posterize', 'build_parser', 'command',
           'load_training_state', 'main', 'parse_args', 'resolve_config_path']

_logger = logging.getLogger('vim.train')
_VIM = Path(__file__).resolve().parents[1]
# The presets (configs/imagenet/*.yaml): package data in an installed wheel (vim/configs/imagenet), the source tree's
# configs/ in a checkout (editable install)
CONFIG_DIR = next((d for d in (_VIM / 'configs' / 'imagenet', _VIM.parent / 'configs' / 'imagenet') if d.is_dir()),
                  _VIM / 'configs' / 'imagenet')


def build_parser() -> argparse.ArgumentParser:
    """Defaults are the official Vim/DeiT main.py defaults; the presets in configs/imagenet/ add the per-model ones."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--config', default='', help='YAML preset: a path or a name in configs/imagenet/')
    p.add_argument('data_dir', nargs='?', default=None, help='ImageFolder root with train/ and val/')
    g = p.add_argument_group('data')
    g.add_argument('--train-split', default='train')
    g.add_argument('--val-split', default='val')
    g.add_argument('--class-map', default='', help='file mapping folder names to class indices (timm format)')
    g.add_argument('--workers', '-j', type=int, default=8, help='loader processes per training process')
    g.add_argument('--pin-mem', action=argparse.BooleanOptionalAction, default=None, help='default: on CUDA')
    g.add_argument('--img-size', type=int, default=None, help='input size (default: the model config)')
    g.add_argument('--crop-pct', type=float, default=None, help='eval center-crop fraction (default: model config)')
    g.add_argument('--interpolation', default='', help='eval resize interpolation (default: model config)')
    g.add_argument('--mean', type=float, nargs='+', default=None)
    g.add_argument('--std', type=float, nargs='+', default=None)
    g.add_argument('--validation-batch-size', type=int, default=None, help='default: --batch-size')
    g = p.add_argument_group('model')
    g.add_argument('--model', default='vim_tiny_patch16_224', help='timm model name[.tag]')
    g.add_argument('--pretrained', action='store_true', help="start from the model tag's pretrained weights")
    g.add_argument('--initial-checkpoint', default='', help='start from these weights: a local file (official '
                   '.pth, state dict, safetensors, training state) or hf-hub:ORG/REPO/FILE')
    g.add_argument('--num-classes', type=int, default=None, help='default: the number of class folders')
    g.add_argument('--drop', type=float, default=0.0, help='dropout before the head')
    g.add_argument('--drop-path', type=float, default=0.1, help='stochastic depth rate')
    g.add_argument('--grad-checkpointing', action='store_true')
    g.add_argument('--scan-recompute', action='store_true',
                   help="each mixer runs its conv, projections and scan again in the backward instead of keeping "
                        'their outputs: less memory for one more forward scan a layer (VisionMamba.set_scan_recompute)')
    add_compile_arguments(g)
    g = p.add_argument_group('optimizer')
    g.add_argument('--opt', default='adamw')
    g.add_argument('--opt-eps', type=float, default=1e-8)
    g.add_argument('--opt-betas', type=float, nargs='+', default=None)
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=0.05)
    g.add_argument('--layer-decay', type=float, default=None, help='layer-wise lr decay (fine-tuning)')
    g.add_argument('--clip-grad', type=float, default=None, help='max gradient norm (default: no clipping)')
    g.add_argument('--lr', type=float, default=None, help='learning rate (default: from --lr-base)')
    g.add_argument('--lr-base', type=float, default=5e-4, help='lr per --lr-base-size images of global batch')
    g.add_argument('--lr-base-size', type=int, default=512)
    g = p.add_argument_group('schedule')
    g.add_argument('--sched', default='cosine')
    g.add_argument('--epochs', type=int, default=300)
    g.add_argument('--warmup-epochs', type=int, default=5)
    g.add_argument('--warmup-lr', type=float, default=1e-6)
    g.add_argument('--min-lr', type=float, default=1e-5)
    g.add_argument('--cooldown-epochs', type=int, default=0)
    g.add_argument('--sched-on-updates', action='store_true', help='update the lr every step (default: per epoch)')
    g = p.add_argument_group('augmentation and regularisation')
    g.add_argument('--aa', default='rand-m9-mstd0.5-inc1', help="timm auto-augment policy ('' for none)")
    g.add_argument('--color-jitter', type=float, default=0.3, help='used only without --aa')
    g.add_argument('--train-interpolation', default='bicubic')
    g.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0], help='random-resized-crop area range')
    g.add_argument('--ratio', type=float, nargs=2, default=[3 / 4, 4 / 3], help='random-resized-crop aspect range')
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--reprob', type=float, default=0.25, help='random erasing probability')
    g.add_argument('--remode', default='pixel')
    g.add_argument('--recount', type=int, default=1)
    g.add_argument('--mixup', type=float, default=0.8, help='mixup alpha (0: off)')
    g.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha (0: off)')
    g.add_argument('--cutmix-minmax', type=float, nargs=2, default=None)
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', default='batch', choices=['batch', 'pair', 'elem'])
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--aug-repeats', type=int, default=0, help='repeated augmentation count (multi-process only)')
    g.add_argument('--model-ema', action=argparse.BooleanOptionalAction, default=True)
    g.add_argument('--model-ema-decay', type=float, default=0.99996)
    g.add_argument('--model-ema-force-cpu', action='store_true', help='keep the EMA on the CPU (not evaluated)')
    g = p.add_argument_group('run')
    g.add_argument('--batch-size', '-b', type=int, default=128, help='per process')
    g.add_argument('--output', default='', help='output folder (default: outputs/train/<config or model>)')
    g.add_argument('--resume', nargs='?', const='auto', default='', metavar='STATE',
                   help='continue from a training state (no value: <output>/last_state.pth if present)')
    g.add_argument('--save-every-steps', type=int, default=500, help='also save the state every N steps (0: off)')
    g.add_argument('--eval-interval', type=int, default=1, help='validate every N epochs and at the end (0: off)')
    g.add_argument('--log-interval', type=int, default=50, help='steps between progress lines')
    g.add_argument('--max-steps', type=int, default=None, help='stop (after saving) once this many steps are done')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    g.add_argument('--amp-dtype', choices=['auto', *AMP_DTYPES], default='auto',
                   help='autocast dtype; auto: bf16 on CUDA, fp32 elsewhere')
    g.add_argument('--max-nonfinite', type=int, default=20, help='consecutive non-finite steps before aborting')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--debug-nan-steps', type=int, nargs='+', default=[], metavar='STEP',
                   help='debugging: replace the loss of these (1-based) steps by NaN to exercise the guard')
    return p


def resolve_config_path(name: str) -> Path:
    """A YAML file: ``name`` itself if it is a file, else the preset of that name (``.yaml`` optional) in CONFIG_DIR."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f'{name}.yaml'):
        if candidate.is_file():
            return candidate
    presets = ', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.yaml')))
    raise FileNotFoundError(f'config {name!r} is neither a file nor a preset in {CONFIG_DIR} ({presets})')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line over preset over defaults (the timm train.py scheme, with unknown preset keys refused)."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('-c', '--config', default='')
    known, _ = pre.parse_known_args(argv)
    if known.config:
        path = resolve_config_path(known.config)
        cfg = yaml.safe_load(path.read_text()) or {}
        dests = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - dests)
        if unknown:
            parser.error(f'{path}: unknown option(s) {unknown}')
        parser.set_defaults(**cfg)
    args = parser.parse_args(argv)
    if not args.data_dir:
        parser.error('data_dir is required (an ImageFolder root with train/ and val/)')
    if not args.output:
        name = resolve_config_path(args.config).stem if args.config else args.model.replace('/', '_')
        args.output = str(Path('outputs') / 'train' / name)
    return args



def _find_resume(args) -> Path | None:
    if not args.resume:
        return None
    if args.resume == 'auto':
        path = Path(args.output) / STATE_FILE
        if not path.is_file():
            _logger.info(f'--resume: no {path} yet, starting a new run')
            return None
        return path
    path = Path(args.resume).expanduser()
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f'--resume {path}: no such training state')
    return path


@contextlib.contextmanager
def _logging_to(output: Path, primary: bool, rank: int):
    fmt = logging.Formatter('%(asctime)s %(levelname).1s %(message)s' if primary else
                            f'%(asctime)s %(levelname).1s [rank {rank}] %(message)s', '%Y-%m-%d %H:%M:%S')
    handlers = [logging.StreamHandler(sys.stdout)]
    if primary:
        handlers.append(logging.FileHandler(output / 'train.log'))
    old_level, old_propagate = _logger.level, _logger.propagate
    _logger.setLevel(logging.INFO if primary else logging.WARNING)
    _logger.propagate = False
    for h in handlers:
        h.setFormatter(fmt)
        _logger.addHandler(h)
    try:
        yield
    finally:
        for h in handlers:
            _logger.removeHandler(h)
            h.close()
        _logger.setLevel(old_level)
        _logger.propagate = old_propagate


def main(argv: list[str] | None = None) -> dict:
    """Train as described by ``argv`` (see ``--help``); returns the final progress and output paths."""
    args = parse_args(argv)
    device = init_distributed_device(args)
    out = Path(args.output)
    if args.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob('.*.tmp-*'):  # left by a process killed while writing
            stale.unlink(missing_ok=True)
    previous_handler = None
    try:
        with _logging_to(out, args.rank == 0, args.rank):
            resume = _find_resume(args)
            trainer = Trainer(args, device, initial_weights=resume is None)
            if resume is not None:
                trainer.load(resume)
            if args.rank == 0:
                (out / 'args.yaml').write_text(yaml.safe_dump(to_builtins(vars(args)), sort_keys=False))

            def request_stop(signum, frame):
                trainer.stop_requested = True
                _logger.warning(f'signal {signum}: saving at the end of this step, then stopping')

            with contextlib.suppress(ValueError):  # not the main thread: no handler
                previous_handler = signal.signal(signal.SIGTERM, request_stop)
            try:
                return trainer.fit()
            except NonFiniteLossError as e:
                _logger.error(str(e))
                raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        if args.distributed and dist.is_initialized():
            dist.destroy_process_group()


def command(argv: list[str] | None = None) -> int:
    """The ``vim-train`` command (``tools/train.py``, ``python -m vim.train``): ``main`` with the process exit status,
    3 when the non-finite-loss guard stopped the run."""
    try:
        main(argv)
    except NonFiniteLossError:
        return 3
    return 0
