"""Evaluation of image classifiers: model creation from a hub tag or a checkpoint file, a deterministic ImageFolder
loader, and the loop that measures top-1 / top-5 / loss / throughput (single process or summed over a distributed
run). The ``vim-validate`` command (``tools/validate.py``) is ``vim.eval.cli``.

    from vim.eval import create_model, create_eval_loader, evaluate
    model = create_model('vim_tiny_patch16_224', checkpoint='best_ema.safetensors')
"""
from .loop import create_eval_loader, evaluate
from .model import checkpoint_num_classes, create_model, is_vim_model

__all__ = ['checkpoint_num_classes', 'create_eval_loader', 'create_model', 'evaluate', 'is_vim_model']
