"""Compile every autotune config of the Triton scan and conv in parallel processes, before a GPU run's timed steps.

    python benchmarks/precompile.py --dtypes bf16 fp32 --chunks 8 4

A first call at a new shape compiles each config of each kernel in turn (triton's autotuner, one process: ~60 s of
one core per dtype for triton 3.6's sm_90 build, mostly the backward's two kernels), which a GPU session pays in
device time. Here process i pins config i of every kernel (``kernel.configs``, as the tests do) and runs the ops
once on the shapes that the scan benchmark, the model benchmark and the ``auto`` self-check launch (batch 1 and
several, split and whole sequences: each compiles its own specialisation), so the configs compile side by side
into triton's on-disk cache. The timed steps then load them from there; their autotuner still times every config.
The first use (2026-11-27, H100, 15 processes on 16 cores) did not finish in its 110 s while every process still
drew its large inputs on the CPU; they are now drawn on the GPU.
"""
from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import time

# (batch, seqlen) at d_inner 384: Vim-Ti at 1248^2 b1 / b8, 224^2 b128, 2048^2 b1 (benchmark_scan's default shapes)
SHAPES = ((1, 6085), (8, 6085), (128, 197), (1, 16385))


def _work(dtype_name: str, index: int, chunk: int, device_name: str = 'cuda') -> str:
    import torch
    from vim.kernels import triton as tk
    from vim.kernels.selfcheck import CHECK_CASES, case_inputs

    from vim.benchmark.scan import DTYPES, conv_inputs, scan_inputs

    t0 = time.perf_counter()
    for kernel in tk.AUTOTUNED_KERNELS:
        configs = tk.CONFIGS[kernel.fn.__name__]
        kernel.configs = [configs[index % len(configs)]]
    dtype, device = DTYPES[dtype_name], torch.device(device_name)
    scan = functools.partial(tk.bidirectional_scan_triton, chunk_size=chunk)

    def run(scan_args, conv_args=()):
        with torch.no_grad():  # the inference forward (no saved states) is a kernel of its own
            scan(*scan_args)
        leaves = [t.detach().clone().requires_grad_() for t in (*scan_args, *conv_args)]
        outs = [scan(*leaves[:8])]
        if conv_args:
            outs.append(tk.bidirectional_conv_silu_triton(*leaves[8:]))
        torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])

    for batch, seqlen in SHAPES:
        run(scan_inputs(batch, 384, 16, seqlen, dtype, device))
    if chunk == tk.DEFAULT_CHUNK:  # the conv and the self-check's cases (the model's mixer layout among them)
        for i, case in enumerate((*CHECK_CASES, CHECK_CASES[0]._replace(batch=1))):
            run(*case_inputs(case, dtype, device, seed=i))
        for batch, seqlen in SHAPES:
            xz, weight, bias = (t.requires_grad_() for t in conv_inputs(batch, 384, seqlen, 4, dtype, device))
            y = tk.bidirectional_conv_silu_triton(xz.transpose(1, 2)[:, :384], weight, bias)
            torch.autograd.grad(y, (xz, weight, bias), torch.ones_like(y))
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return f'{dtype_name} config {index} chunk {chunk}: {time.perf_counter() - t0:.1f} s'


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dtypes', nargs='+', default=['bf16', 'fp32'])
    p.add_argument('--chunks', nargs='+', type=int, default=None, help="scan chunk sizes (default: the op's)")
    p.add_argument('--jobs', type=int, default=16, help='processes at once')
    args = p.parse_args()
    from vim.kernels.triton import CONFIGS, DEFAULT_CHUNK
    n_configs = max(len(c) for c in CONFIGS.values())
    tasks = [(d, i, c) for c in args.chunks or [DEFAULT_CHUNK] for d in args.dtypes for i in range(n_configs)
             if c == DEFAULT_CHUNK or d == args.dtypes[0]]  # another chunk size: the first dtype only
    t0 = time.perf_counter()
    with mp.get_context('spawn').Pool(min(args.jobs, len(tasks))) as pool:
        for line in pool.starmap(_work, tasks):
            print(line, flush=True)
    print(f'precompiled {len(tasks)} tasks in {time.perf_counter() - t0:.1f} s')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
