"""Image-classification training with the official Vim (DeiT) recipe on timm's building blocks.

The engine of the ``vim-train`` command (``tools/train.py``, ``python -m vim.train``, ``vim.train.cli``):
- ``Trainer(args, device)``: one run built from the command's arguments (``vim.train.cli.parse_args``): data,
  model, EMA, optimizer, schedule; ``fit()`` trains with validation, the non-finite-loss guard and exact-resume
  saves, ``load(path)`` resumes;
- ``vim.train.state``: the training-state file (``load_training_state``), safetensors weights, RNG capture/restore;
- ``vim.train.data``: the resumable training loader and the validation loader;
- ``vim.train.model``: the model with its initial weights, mixup/cutmix and the loss.
"""
from .cli import build_parser, command, main, parse_args, resolve_config_path
from .data import ResumableSampler, allow_zero_bit_posterize, create_train_loader, create_val_loader
from .model import create_criterion, create_model
from .state import STATE_FILE, STATE_FORMAT, Progress, load_training_state, save_weights
from .trainer import AMP_DTYPES, NonFiniteLossError, Trainer

__all__ = ['AMP_DTYPES', 'STATE_FILE', 'STATE_FORMAT', 'NonFiniteLossError', 'Progress', 'ResumableSampler',
           'Trainer', 'allow_zero_bit_posterize', 'build_parser', 'command', 'create_criterion', 'create_model',
           'create_train_loader', 'create_val_loader', 'load_training_state', 'main', 'parse_args',
           'resolve_config_path', 'save_weights']
