"""Speed measurements that always carry their comparison from the same run, written as JSON.

- ``vim.benchmark.model``: Vim against DeiT (timm, SDPA attention), inference and training, side by side
  (``measure_pair``, ``inference_case``, ``training_case``, ``count_gflops``); the ``vim-benchmark`` command
  (``tools/benchmark.py``) is its ``main``.
- ``vim.benchmark.scan``: the mixer's ops alone (bidirectional scan, conv + silu) against their bytes / exp floor
  (``run``, ``measure``, ``measure_conv``, ``copy_bandwidth``); the ``vim-benchmark-scan`` command
  (``tools/benchmark_scan.py``) is its ``main``.
"""
