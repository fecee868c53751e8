#!/usr/bin/env python3
"""Extract Vim features from images (the `vim-extract-features` command; `--help` for the options)."""
import os
import sys

# Idle OpenMP threads sleep instead of spinning: on a busy CPU, spinning threads of the many small ops of the
# reference scan steal the cores from each other (Vim-Ti 512², 2 cores under load: 13-19 s per image with the
# default policy, 1.8 s with this one). It must be set before torch loads; an OMP_WAIT_POLICY set by the user wins.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

from vim.features.cli import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
