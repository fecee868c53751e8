#!/usr/bin/env python3
"""Export to ONNX, checked with onnxruntime: the ``vim-export-onnx`` command (vim.onnx), see ``--help``."""
import sys

from vim.onnx import main

if __name__ == '__main__':
    sys.exit(main())
