#!/usr/bin/env python3
"""Image-classification training: the ``vim-train`` command (vim.train.cli), see ``--help``.

    torchrun --nproc_per_node 8 tools/train.py /data/imagenet --config vim_small_patch16_224
"""
import sys

from vim.train.cli import command

if __name__ == '__main__':
    sys.exit(command())
