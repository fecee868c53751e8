#!/usr/bin/env python
"""Evaluate a trained detector or segmentor (mmdet / mmseg config + checkpoint) with mmengine's Runner.

    python tools/test_mm.py CONFIG CHECKPOINT [--work-dir DIR] [--out results.pkl] [--data-root DIR]
    torchrun --nproc-per-node 4 tools/test_mm.py CONFIG CHECKPOINT --launcher pytorch

The same command is installed as ``vim-test-mm`` (:func:`vim.mm.cli.test_main`).
"""
from vim.mm.cli import test_main

if __name__ == '__main__':
    test_main()
