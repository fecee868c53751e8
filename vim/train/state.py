"""The files a training run (vim-train, tools/train.py) writes and what makes a resumed run exact: the
training-state format, weight files, the RNG states of python, numpy and torch, and the progress counters."""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from vim.utils import atomic_write

STATE_FILE = 'last_state.pth'
STATE_FORMAT = 'vim-train-state/1'


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write ``state_dict`` as safetensors (CPU, contiguous) with ``metadata`` as strings, atomically."""
    tensors = {k: v.detach().to('cpu').contiguous() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()}))


def load_training_state(path: str | Path) -> dict:
    """A state written by ``Trainer.save`` (``format`` == STATE_FORMAT), on the CPU; anything else raises."""
    state = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
        raise ValueError(f'{path} is not a training state written by tools/train.py ({STATE_FORMAT})')
    return state


def to_builtins(value):
    """Arguments as YAML/pickle-safe builtins."""
    if isinstance(value, dict):
        return {k: to_builtins(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_builtins(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def capture_rng() -> dict:
    """This process's python, numpy, torch and CUDA generator states, as tensors and builtins."""
    np_state = np.random.get_state()
    return {
        'python': random.getstate(),
        'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                  'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    """Undo ``capture_rng``; the CUDA states only where the same number of devices is visible."""
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
