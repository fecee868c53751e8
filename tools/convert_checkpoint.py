#!/usr/bin/env python3
"""Checkpoint to safetensors: the ``vim-convert-checkpoint`` command (vim.convert), see ``--help``."""
import sys

from vim.convert import main

if __name__ == '__main__':
    sys.exit(main())
