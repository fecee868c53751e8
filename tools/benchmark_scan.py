#!/usr/bin/env python3
"""The mixer's ops against their floor: the ``vim-benchmark-scan`` command (vim.benchmark.scan), see ``--help``."""
import sys

from vim.benchmark.scan import main

if __name__ == '__main__':
    sys.exit(main())
