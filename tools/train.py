#!/usr/bin/env python3
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
import dataclasses
import itertools
import json
import logging
import math
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import save_file
from timm.data import Mixup, create_dataset, create_transform, resolve_data_config
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, init_distributed_device
from torch.nn.parallel import DistributedDataParallel

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
for _path in (REPO, TOOLS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
from validate import create_eval_loader, evaluate, is_vim_model  # noqa: E402  (imports vim: registers the models)

from vim.utils import atomic_write  # noqa: E402

_logger = logging.getLogger('vim.train')
CONFIG_DIR = REPO / 'configs' / 'imagenet'
STATE_FILE = 'last_state.pth'
STATE_FORMAT = 'vim-train-state/1'
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': None}


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


# ---- arguments ------------------------------------------------------------------------------------------------
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
        args.output = str(REPO / 'outputs' / 'train' / name)
    return args


# ---- files ------------------------------------------------------------------------------------------------------
def save_weights(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict) -> None:
    tensors = {k: v.detach().to('cpu').contiguous() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()}))


def load_training_state(path: str | Path) -> dict:
    state = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
        raise ValueError(f'{path} is not a training state written by tools/train.py ({STATE_FORMAT})')
    return state


def _plain(value):
    """Arguments as YAML/pickle-safe builtins."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def capture_rng() -> dict:
    np_state = np.random.get_state()
    return {
        'python': random.getstate(),
        'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                  'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


@dataclasses.dataclass
class Progress:
    epoch: int = 0              # the epoch being trained (0-based)
    step_in_epoch: int = 0      # batches of that epoch already done
    global_step: int = 0        # batches done in all
    best_top1: float = -1.0
    best_ema_top1: float = -1.0
    epoch_loss_sum: float = 0.0    # over the finite steps of the current epoch
    epoch_loss_steps: int = 0
    nonfinite_total: int = 0
    nonfinite_streak: int = 0      # consecutive non-finite steps up to now (across epochs and resumes)
    nonfinite_steps: list = dataclasses.field(default_factory=list)  # the latest 1000


# ---- data -------------------------------------------------------------------------------------------------------
def allow_zero_bit_posterize() -> bool:
    """Let timm's RandAugment posterize to 0 bits again (a black image) under Pillow versions that refuse it.

    The official policy 'rand-m9-mstd0.5-inc1' uses PosterizeIncreasing, which keeps ``4 - int(4 * m / 10)`` bits;
    the magnitude noise reaches the cap m = 10 in ~2% of draws, asking for 0 bits. Older Pillow (and the TF
    reference) returned black; Pillow 13 raises ValueError, which would kill a run within minutes on ImageNet.
    Returns whether timm's op table was patched.
    """
    from PIL import Image, ImageOps
    from timm.data import auto_augment

    try:
        ImageOps.posterize(Image.new('RGB', (1, 1)), 0)
        return False
    except ValueError:
        pass
    original = auto_augment.posterize

    def posterize(img, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:
            return img.point([0] * 256 * len(img.getbands()))  # what ImageOps.posterize(img, 0) used to do
        return original(img, bits_to_keep, **kwargs)

    patched = False
    for name, op in auto_augment.NAME_TO_OP.items():
        if op is original:
            auto_augment.NAME_TO_OP[name] = posterize
            patched = True
    return patched


class ResumableSampler(torch.utils.data.Sampler):
    """An epoch-seeded sampler whose next pass can skip its first ``skip`` indices (the batches done before an
    interruption), so that a resumed epoch sees exactly the images the interrupted one had left."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.sampler), skip, None)

    def __len__(self) -> int:
        return len(self.sampler)


def create_train_loader(args, dataset, data_config: dict, pin_memory: bool) -> torch.utils.data.DataLoader:
    if args.aa and allow_zero_bit_posterize():
        _logger.info('patched timm RandAugment posterize for 0 bits (refused by this Pillow version)')
    dataset.transform = create_transform(
        data_config['input_size'], is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio),
        hflip=args.hflip, color_jitter=args.color_jitter, auto_augment=args.aa or None,
        interpolation=args.train_interpolation, mean=data_config['mean'], std=data_config['std'],
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
    if args.distributed and args.aug_repeats > 0:
        sampler = RepeatAugSampler(dataset, num_replicas=args.world_size, rank=args.rank, shuffle=True,
                                   num_repeats=args.aug_repeats)
    else:
        # also without a process group: a fixed, epoch-seeded permutation makes the order reproducible on resume
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=args.world_size, rank=args.rank, shuffle=True, seed=args.seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=ResumableSampler(sampler), num_workers=args.workers,
        pin_memory=pin_memory, drop_last=True, persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(args.seed + args.rank))


def create_model(args, num_classes: int, initial_weights: bool = True) -> torch.nn.Module:
    """The model, with --pretrained / --initial-checkpoint weights unless ``initial_weights`` is False (a resumed
    run, whose weights come from its state: no download needed)."""
    kwargs = dict(num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path)
    if args.img_size is not None:
        kwargs['img_size'] = args.img_size
    if not initial_weights:
        return timm.create_model(args.model, pretrained=False, **kwargs)
    source = args.initial_checkpoint
    if source.startswith('hf-hub:'):
        parts = source[len('hf-hub:'):].split('/')
        if len(parts) < 3:
            raise ValueError(f'--initial-checkpoint {source}: expected hf-hub:ORG/REPO/FILE')
        overlay = dict(hf_hub_id='/'.join(parts[:2]), hf_hub_filename='/'.join(parts[2:]),
                       custom_load='hf' if is_vim_model(args.model) else False)
        return timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    if source:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f'--initial-checkpoint {path} not found')
        return timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    return timm.create_model(args.model, pretrained=args.pretrained, **kwargs)


# ---- training ---------------------------------------------------------------------------------------------------
class Trainer:
    """One training run: built from the arguments, optionally resumed, then ``fit()``."""

    def __init__(self, args: argparse.Namespace, device: torch.device, initial_weights: bool = True) -> None:
        self.args, self.device = args, device
        self.primary = args.rank == 0
        self.out = Path(args.output)
        amp = args.amp_dtype if args.amp_dtype != 'auto' else ('bf16' if device.type == 'cuda' else 'fp32')
        self.amp_name, self.amp_dtype = amp, AMP_DTYPES[amp]
        if device.type == 'cuda':
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # data
        train_set = create_dataset('', root=args.data_dir, split=args.train_split, is_training=True,
                                   class_map=args.class_map or None)
        classes = getattr(train_set.reader, 'class_to_idx', None) or {}
        self.num_classes = args.num_classes or len(classes)
        if classes and len(classes) > self.num_classes:
            raise ValueError(f'{len(classes)} class folders but --num-classes {self.num_classes}')

        # model (same seed on every process: the EMA copy is taken before DDP broadcasts rank 0's weights)
        seed_everything(args.seed)
        self.model = create_model(args, self.num_classes, initial_weights).to(device)
        if args.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        data_config = resolve_data_config(vars(args), model=self.model)
        self.ema = None
        if args.model_ema:
            self.ema = ModelEmaV3(self.model, decay=args.model_ema_decay,
                                  device=torch.device('cpu') if args.model_ema_force_cpu else None)
        seed_everything(args.seed + args.rank)  # different augmentations and drop paths per process
        self.ddp = (DistributedDataParallel(self.model, device_ids=[device.index] if device.type == 'cuda' else None)
                    if args.distributed else self.model)

        pin = args.pin_mem if args.pin_mem is not None else device.type == 'cuda'
        self.train_loader = create_train_loader(args, train_set, data_config, pin)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f'{len(train_set)} training images per process are fewer than one batch '
                             f'({args.batch_size})')
        self.val_loader = None
        if args.eval_interval:
            self.val_loader = create_eval_loader(
                args.data_dir, args.val_split, data_config, args.validation_batch_size or args.batch_size,
                args.workers, class_map=args.class_map, rank=args.rank, world_size=args.world_size, pin_memory=pin)
            val_set = self.val_loader.dataset
            val_set = val_set.dataset if isinstance(val_set, torch.utils.data.Subset) else val_set
            val_classes = getattr(val_set.reader, 'class_to_idx', None)
            if not args.class_map and classes and val_classes != classes:
                raise ValueError(f'the class folders of {args.val_split} and {args.train_split} differ; labels '
                                 'would not match (pass --class-map)')

        self.mixup = None
        if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
            if args.batch_size % 2:
                raise ValueError('mixup/cutmix needs an even --batch-size')
            self.mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                               prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                               label_smoothing=args.smoothing, num_classes=self.num_classes)
            self.criterion = SoftTargetCrossEntropy()  # the smoothing is in the mixed targets
        elif args.smoothing:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
        else:
            self.criterion = torch.nn.CrossEntropyLoss()

        global_batch = args.batch_size * args.world_size
        if args.lr is None:
            args.lr = args.lr_base * global_batch / args.lr_base_size
        opt_kwargs = dict(eps=args.opt_eps)
        if args.opt_betas:
            opt_kwargs['betas'] = tuple(args.opt_betas)
        self.optimizer = create_optimizer_v2(self.model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                             momentum=args.momentum, layer_decay=args.layer_decay, **opt_kwargs)
        self.scheduler, self.num_epochs = create_scheduler_v2(
            self.optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
            warmup_lr=args.warmup_lr, min_lr=args.min_lr, cooldown_epochs=args.cooldown_epochs,
            step_on_epochs=not args.sched_on_updates, updates_per_epoch=self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_name == 'fp16' else None
        self.progress = Progress()
        self.stop_requested = False

        n_params = sum(p.numel() for p in self.model.parameters())
        _logger.info(f'{args.model}: {n_params:,} parameters, {self.num_classes} classes, '
                     f'{len(train_set)} training images, {self.steps_per_epoch} steps/epoch x {self.num_epochs} '
                     f'epochs, global batch {global_batch} ({args.world_size} x {args.batch_size}), lr {args.lr:.3g}, '
                     f'{"autocast " + amp if self.amp_dtype else "fp32"} on {device}')
        _logger.info(f'data config {data_config}')
        if args.aug_repeats and not args.distributed:
            _logger.info('--aug-repeats applies to multi-process runs only; not used')

    # ---- state ----
    def state_dict(self) -> dict:
        rng = capture_rng()
        if self.args.distributed:
            gathered = [None] * self.args.world_size
            dist.all_gather_object(gathered, rng)
            rng = gathered
        else:
            rng = [rng]
        return {
            'format': STATE_FORMAT,
            'model': self.model.state_dict(),
            'model_ema': self.ema.module.state_dict() if self.ema is not None else None,
            'optimizer': self.optimizer.state_dict(),
            'scheduler': self.scheduler.state_dict() if self.scheduler is not None else None,
            'scaler': self.scaler.state_dict() if self.scaler is not None else None,
            'progress': dataclasses.asdict(self.progress),
            'rng': rng,
            'world_size': self.args.world_size,
            'batch_size': self.args.batch_size,
            'steps_per_epoch': self.steps_per_epoch,
            'args': _plain(vars(self.args)),
        }

    def save(self, reason: str) -> None:
        """Weights (safetensors) then the training state; every process takes part (RNG states)."""
        state = self.state_dict()
        if not self.primary:
            return
        p = self.progress
        meta = dict(model=self.args.model, num_classes=self.num_classes, epoch=p.epoch, step=p.global_step)
        save_weights(self.out / 'last.safetensors', state['model'], meta)
        if state['model_ema'] is not None:
            save_weights(self.out / 'last_ema.safetensors', state['model_ema'], dict(meta, ema=True))
        atomic_write(self.out / STATE_FILE, lambda tmp: torch.save(state, tmp))
        _logger.info(f'saved {self.out / STATE_FILE} ({reason}: epoch {p.epoch}, step {p.step_in_epoch}/'
                     f'{self.steps_per_epoch}, global step {p.global_step})')

    def load(self, path: Path) -> None:
        state = load_training_state(path)
        saved = state['args']
        if saved.get('model') != self.args.model:
            raise ValueError(f"{path} was trained as {saved.get('model')}, not {self.args.model}")
        progress = Progress(**state['progress'])
        same_layout = (state['world_size'], state['batch_size']) == (self.args.world_size, self.args.batch_size)
        if progress.step_in_epoch and not same_layout:
            raise ValueError(
                f'{path} stopped inside epoch {progress.epoch} with {state["world_size"]} x {state["batch_size"]} '
                f'images per step; resume it with the same number of processes and --batch-size')
        self.model.load_state_dict(state['model'])
        if self.ema is not None:
            if state['model_ema'] is not None:
                self.ema.module.load_state_dict(state['model_ema'])
            else:
                _logger.warning(f'{path} has no EMA; the EMA restarts from the current weights')
                self.ema.module.load_state_dict(state['model'])
        self.optimizer.load_state_dict(state['optimizer'])
        if self.scheduler is not None and state['scheduler'] is not None:
            self.scheduler.load_state_dict(state['scheduler'])
        if self.scaler is not None and state['scaler'] is not None:
            self.scaler.load_state_dict(state['scaler'])
        self.progress = progress
        if len(state['rng']) == self.args.world_size:
            restore_rng(state['rng'][self.args.rank])
        else:
            _logger.warning(f'{path} holds RNG states of {len(state["rng"])} processes; reseeding')
            seed_everything(self.args.seed + self.args.rank + progress.global_step)
        if state['steps_per_epoch'] != self.steps_per_epoch:
            _logger.warning(f'steps per epoch changed ({state["steps_per_epoch"]} -> {self.steps_per_epoch})')
        _logger.info(f'resumed from {path}: epoch {progress.epoch}, step {progress.step_in_epoch}/'
                     f'{self.steps_per_epoch}, global step {progress.global_step}')

    # ---- loop ----
    def _step(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, bool, bool]:
        """One update; returns (loss, grad norm, finite, stop requested anywhere), all agreed over processes."""
        args, p = self.args, self.progress
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        if self.scheduler is not None:
            self.scheduler.step_update(p.global_step)
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with amp:
            loss = self.criterion(self.ddp(images), targets)
        if p.global_step + 1 in args.debug_nan_steps:
            loss = loss * float('nan')
        params = [q for q in self.model.parameters() if q.requires_grad]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        grads = [q.grad for q in params if q.grad is not None]
        if args.clip_grad is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
        else:
            grad_norm = torch.nn.utils.get_total_norm(grads)
        # one small all-reduce: every process must take the same skip / stop decision
        flags = torch.stack([loss.detach().float(), grad_norm.float().to(loss.device),
                             torch.tensor(float(self.stop_requested), device=loss.device)])
        if args.distributed:
            dist.all_reduce(flags)
        loss_sum, grad_norm, stop = flags.tolist()
        loss_value = loss_sum / args.world_size
        # with fp16 the scaler itself skips steps whose gradients overflowed; only the loss is ours to check
        finite = math.isfinite(loss_value) and (self.scaler is not None or math.isfinite(grad_norm))
        if finite:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model, step=p.global_step + 1)
        elif self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm, finite, stop > 0

    def train_epoch(self, epoch: int) -> dict:
        args, p = self.args, self.progress
        self.ddp.train()
        sampler = self.train_loader.sampler
        sampler.set_epoch(epoch)
        sampler.skip = p.step_in_epoch * args.batch_size
        if self.scheduler is not None:
            self.scheduler.step(epoch)
        global_batch = args.batch_size * args.world_size
        losses, epoch_start_step = [], p.step_in_epoch
        start = last_log = time.perf_counter()
        last_log_step = p.step_in_epoch
        for images, targets in self.train_loader:
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            loss, grad_norm, finite, stop = self._step(images, targets)
            p.global_step += 1
            p.step_in_epoch += 1
            if finite:
                p.nonfinite_streak = 0
                losses.append(loss)
                p.epoch_loss_sum += loss
                p.epoch_loss_steps += 1
            else:
                p.nonfinite_streak += 1
                p.nonfinite_total += 1
                p.nonfinite_steps = (p.nonfinite_steps + [p.global_step])[-1000:]
                _logger.warning(f'non-finite loss {loss:.4g} / grad norm {grad_norm:.4g} at global step '
                                f'{p.global_step} (epoch {epoch}, step {p.step_in_epoch}/{self.steps_per_epoch}): '
                                f'update skipped [{p.nonfinite_streak} in a row, {p.nonfinite_total} in all]')
                if p.nonfinite_streak >= args.max_nonfinite:
                    raise NonFiniteLossError(
                        f'{p.nonfinite_streak} consecutive non-finite steps (global steps '
                        f'{p.global_step - p.nonfinite_streak + 1}-{p.global_step}); stopping. The last saved state is '
                        f'{self.out / STATE_FILE}; try a lower --lr, --clip-grad or --amp-dtype fp32.')
            done = p.step_in_epoch == self.steps_per_epoch
            if args.log_interval and (p.step_in_epoch % args.log_interval == 0 or done):
                now = time.perf_counter()
                rate = (p.step_in_epoch - last_log_step) * global_batch / max(now - last_log, 1e-9)
                last_log, last_log_step = now, p.step_in_epoch
                mem = (f' mem {torch.cuda.max_memory_allocated(self.device) / 2 ** 30:.2f}GiB'
                       if self.device.type == 'cuda' else '')
                avg = sum(losses[-args.log_interval:]) / max(len(losses[-args.log_interval:]), 1)
                _logger.info(f'epoch {epoch} [{p.step_in_epoch}/{self.steps_per_epoch}] global step '
                             f'{p.global_step} loss {loss:.4f} (avg {avg:.4f}) '
                             f'lr {self.optimizer.param_groups[0]["lr"]:.3e} grad-norm {grad_norm:.3f} '
                             f'{rate:.1f} img/s ({rate / args.world_size:.1f} per process) '
                             f'non-finite {p.nonfinite_total}{mem}')
            if stop:
                self.save('stop requested')
                return {'stopped': 'signal'}
            if args.max_steps is not None and p.global_step >= args.max_steps:
                self.save('--max-steps')
                return {'stopped': 'max_steps'}
            if args.save_every_steps and p.global_step % args.save_every_steps == 0 and not done:
                self.save(f'every {args.save_every_steps} steps')
        elapsed = time.perf_counter() - start
        steps = p.step_in_epoch - epoch_start_step
        return {'train_loss': p.epoch_loss_sum / p.epoch_loss_steps if p.epoch_loss_steps else float('nan'),
                'lr': self.optimizer.param_groups[0]['lr'],
                'train_img_per_sec': steps * global_batch / max(elapsed, 1e-9), 'train_time_s': elapsed}

    def validate(self, epoch: int) -> dict:
        metrics = {}
        models = [('', self.model)]
        if self.ema is not None and not self.args.model_ema_force_cpu:
            models.append(('ema_', self.ema.module))
        for prefix, model in models:
            result = evaluate(model, self.val_loader, self.device, amp_dtype=self.amp_dtype,
                              distributed=self.args.distributed)
            metrics.update({f'{prefix}{k}': result[k] for k in ('top1', 'top5', 'loss', 'img_per_sec')})
        _logger.info(f'epoch {epoch} validation: top1 {metrics["top1"]:.3f} top5 {metrics["top5"]:.3f} '
                     f'loss {metrics["loss"]:.4f}' + (f' | EMA top1 {metrics["ema_top1"]:.3f} top5 '
                                                      f'{metrics["ema_top5"]:.3f}' if 'ema_top1' in metrics else ''))
        return metrics

    def _save_best(self, metrics: dict) -> None:
        p = self.progress
        meta = dict(model=self.args.model, num_classes=self.num_classes, epoch=p.epoch, step=p.global_step)
        if metrics['top1'] > p.best_top1:
            p.best_top1 = metrics['top1']
            if self.primary:
                save_weights(self.out / 'best.safetensors', self.model.state_dict(), dict(meta, top1=p.best_top1))
        if 'ema_top1' in metrics and metrics['ema_top1'] > p.best_ema_top1:
            p.best_ema_top1 = metrics['ema_top1']
            if self.primary:
                save_weights(self.out / 'best_ema.safetensors', self.ema.module.state_dict(),
                             dict(meta, top1=p.best_ema_top1, ema=True))

    def fit(self) -> dict:
        args, p = self.args, self.progress
        result = {'stopped': None}
        while p.epoch < self.num_epochs:
            if args.max_steps is not None and p.global_step >= args.max_steps:
                self.save('--max-steps')
                result['stopped'] = 'max_steps'
                break
            epoch = p.epoch
            epoch_start = p.global_step - p.step_in_epoch
            stats = self.train_epoch(epoch)
            if stats.get('stopped'):
                result['stopped'] = stats['stopped']
                break
            last = epoch + 1 == self.num_epochs
            metrics = {}
            if self.val_loader is not None and ((epoch + 1) % args.eval_interval == 0 or last):
                metrics = self.validate(epoch)
                self._save_best(metrics)
            nonfinite = [s for s in p.nonfinite_steps if s > epoch_start]
            p.epoch, p.step_in_epoch, p.epoch_loss_sum, p.epoch_loss_steps = epoch + 1, 0, 0.0, 0
            self.save('end of epoch')
            if self.primary:
                record = dict(epoch=epoch, global_step=p.global_step, **stats, **metrics,
                              nonfinite_steps=nonfinite, nonfinite_total=p.nonfinite_total)
                with open(self.out / 'metrics.jsonl', 'a') as f:
                    f.write(json.dumps(record) + '\n')
            _logger.info(f'epoch {epoch} done: train loss {stats["train_loss"]:.4f}, '
                         f'{stats["train_img_per_sec"]:.1f} img/s, non-finite steps skipped: {len(nonfinite)}'
                         + (f' (global steps {nonfinite})' if nonfinite else ''))
        result.update(dataclasses.asdict(p), output=str(self.out), state=str(self.out / STATE_FILE))
        return result


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
                (out / 'args.yaml').write_text(yaml.safe_dump(_plain(vars(args)), sort_keys=False))

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


if __name__ == '__main__':
    try:
        main()
    except NonFiniteLossError:
        sys.exit(3)
