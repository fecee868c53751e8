#!/usr/bin/env python3
"""Evaluation of a classifier on an ImageFolder split: the ``vim-validate`` command (vim.eval.cli), see ``--help``."""
import sys

from vim.eval.cli import command

if __name__ == '__main__':
    sys.exit(command())
