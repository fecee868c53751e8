"""Where a model's time goes: the self time of every kernel (CUDA) or op (CPU) over a few steady forward passes or
training steps, under torch.profiler, as a table and a JSON report.

    python tools/profile_model.py --device cuda --img-size 1248 --batch-size 8 --dtype bf16     # Vim-Ti inference
    python tools/profile_model.py --device cuda --train --batch-size 128 --dtype bf16           # one AdamW step

The cases are tools/benchmark.py's (``inference_case``, ``training_case``): the same model, input and autocast. One
untimed call first autotunes and warms the caches, so the table holds steady-state kernels only. On CUDA the rows
are kernels with their device time; on CPU, ops with their CPU self time.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from vim.benchmark.model import DTYPES, add_run_arguments, apply_run_arguments, inference_case, training_case
from vim.benchmark.scan import device_name
from vim.utils import atomic_write

__all__ = ['profile_steps', 'main']


def profile_steps(run: Callable[[], object], device: torch.device, steps: int) -> list[dict]:
    """Self time per step of each kernel (CUDA) or op (CPU) over ``steps`` calls of ``run`` after one warm-up call,
    longest first: dicts with ``name``, ``calls`` (per step) and ``ms`` (per step)."""
    cuda = device.type == 'cuda'
    run()
    if cuda:
        torch.cuda.synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            run()
        if cuda:
            torch.cuda.synchronize(device)
    rows = []
    for event in prof.key_averages():
        if cuda and event.device_type != torch.autograd.DeviceType.CUDA:
            continue  # an op's device time is its kernels': counting both would count every kernel twice
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            rows.append(dict(name=event.key, calls=event.count / steps, ms=us / 1e3 / steps))
    return sorted(rows, key=lambda r: -r['ms'])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.add_argument('--model', default='vim_tiny_patch16_224')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--batch-size', type=int, default=1)
    p.add_argument('--dtype', default='bf16', choices=sorted(DTYPES), help='autocast dtype (fp32: none)')
    p.add_argument('--train', action='store_true', help='profile a training step (AdamW) instead of inference')
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--top', type=int, default=25, help='rows printed (the JSON holds all)')
    p.add_argument('--out', type=Path, default=None, help='JSON report')
    args = p.parse_args(argv)
    device, malloc = apply_run_arguments(args)
    make_case = training_case if args.train else inference_case
    run = make_case(args.model, args.img_size, args.batch_size, DTYPES[args.dtype], device)
    rows = profile_steps(run, device, args.steps)
    total = sum(r['ms'] for r in rows)
    what = 'kernel' if device.type == 'cuda' else 'op self'
    print(f'{args.model} {"train" if args.train else "inference"} {args.img_size}px b{args.batch_size} {args.dtype}, '
          f'{device_name(device)}, {malloc}: {total:.3f} ms of {what} time a step')
    print(f'{"ms/step":>9s} {"share":>6s} {"calls":>7s}  name')
    for r in rows[:args.top]:
        print(f'{r["ms"]:9.3f} {r["ms"] / total:6.1%} {r["calls"]:7.1f}  {r["name"][:110]}')
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = ' '.join(['python tools/profile_model.py'] + (argv if argv is not None else sys.argv[1:]))
        report = dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds'), device=device_name(device),
                      torch=torch.__version__, malloc=malloc, model=args.model, img_size=args.img_size,
                      batch=args.batch_size, dtype=args.dtype, mode='train' if args.train else 'inference',
                      steps=args.steps, command=command, total_ms=total, rows=rows)
        atomic_write(args.out, json.dumps(report, indent=1).encode())
    return 0
