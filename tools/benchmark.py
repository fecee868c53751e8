#!/usr/bin/env python3
"""Vim against DeiT in one run: the ``vim-benchmark`` command (vim.benchmark.model), see ``--help``."""
import sys

from vim.benchmark.model import main

if __name__ == '__main__':
    sys.exit(main())
