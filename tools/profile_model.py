#!/usr/bin/env python3
"""Where a model's time goes, kernel by kernel: the ``vim-profile`` command (vim.benchmark.profile), see ``--help``."""
import sys

from vim.benchmark.profile import main

if __name__ == '__main__':
    sys.exit(main())
