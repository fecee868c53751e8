"""``python -m vim.train`` and ``torchrun --nproc_per_node N -m vim.train``: the ``vim-train`` command."""
import sys

from vim.train.cli import command

if __name__ == '__main__':
    sys.exit(command())
