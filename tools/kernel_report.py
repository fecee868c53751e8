"""Static performance report of the Triton scan and conv kernels from their sm_90 compiled code (no GPU needed).

    python tools/kernel_report.py --json benchmarks/kernel-report-sm90-DATE.json

Same as the ``vim-kernel-report`` console script; see :mod:`vim.kernels.triton.report`.
"""
import sys

from vim.kernels.triton.report import main

if __name__ == '__main__':
    sys.exit(main())
