"""Vim against DeiT (timm, SDPA attention), measured side by side in one run.

    python tools/benchmark.py                                   # CPU: Vim-Ti vs DeiT-Ti at 224, batch 1
    python tools/benchmark.py --device cuda --pairs tiny small base --img-sizes 224 512 768 1024 1248 2048 \
        --dtypes fp32 bf16 --train --scan --vim-only-sizes 4096

Each pair (vim_<size>_patch16_224, deit_<size>_patch16_224) is timed in alternating rounds so that both see the
same machine state; the median round counts. Inference: images/s, latency, peak memory (CUDA). Training (--train):
one AdamW step with bf16 autocast on CUDA (fp32 on CPU), images/s and peak memory. ``--cuda-graph`` (CUDA) also
times each inference case captured once in a CUDA graph and replayed, for both models: the GPU's own time, without
the host's work per kernel launch that an eager forward pays. ``--torchcompile [BACKEND]`` (timm's flag; inductor
by default) adds rows of both models compiled ("inference-compiled", "train-compiled"), each case for its own static
shapes, beside the eager rows of the same run.
``--vim-only-sizes``: Vim alone
at batch 1 (e.g. 4096 px, 65k tokens, where DeiT's quadratic attention is out of the comparison). A case that runs
out of GPU memory is recorded as such and the run goes on. The JSON report is rewritten (atomically) after every
case, so an interrupted run keeps what it measured; a PNG plot is written at the end if matplotlib is installed.
The Vim scan backend (``--backend``, default auto: triton on CUDA, the fused kernels on CPU) is recorded in the report.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vim.benchmark import scan as scan_benchmark
from vim.benchmark.scan import device_name, malloc_setting
from vim.kernels import available_backends, resolve_backend
from vim.utils import add_compile_arguments, atomic_write, maybe_compile

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, min_time: float, warmup: int) -> float:
    """Seconds per call: warm up, then repeat until ``min_time`` has passed."""
    for _ in range(warmup):
        fn()
    _sync(device)
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / calls


def _peak_gib(device: torch.device, fn: Callable[[], object]) -> float | None:
    """Peak memory of one call of ``fn``, or what a replayed graph holds (its ``peak_gib``: a replay allocates
    nothing, so the peak of a replay would only count what every live case holds)."""
    if device.type != 'cuda':
        return None
    if hasattr(fn, 'peak_gib'):
        return fn.peak_gib
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


def count_gflops(name: str, size: int) -> float:
    """Forward GFLOPs of one image (2 per multiply-add; the Vim scan counted by its registered formula)."""
    model = timm.create_model(name, dynamic_img_size=True, img_size=size).eval()
    # the math SDPA backend, so that attention shows up as the matmuls the counter knows (the fused CPU kernel
    # has no FLOP formula)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def _compiled(model: torch.nn.Module, torchcompile: tuple[str | None, str | None], device: torch.device,
              dtype: torch.dtype) -> torch.nn.Module:
    """``maybe_compile`` for one case, with torch.compile's caches reset first: each case then compiles for its own
    static shapes. Without the reset a second image size would make the compiled shapes dynamic (torch's automatic
    dynamic shapes) and every new case would count toward dynamo's recompile limit."""
    if torchcompile[0]:
        torch.compiler.reset()
    return maybe_compile(model, *torchcompile, device=device, dtype=dtype)


def inference_case(name: str, size: int, batch: int, dtype: torch.dtype, device: torch.device,
                   cast_cache: bool | None = None, torchcompile: tuple[str | None, str | None] = (None, None)):
    """A function running one forward of ``name`` on a fixed (batch, 3, size, size) input; ``cast_cache``:
    autocast's (default: torch's setting); ``torchcompile``: (backend, mode) of torch.compile, or (None, None)."""
    model = timm.create_model(name, dynamic_img_size=True, img_size=size).to(device).eval()
    model = _compiled(model, torchcompile, device, dtype)
    x = torch.randn(batch, 3, size, size, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=cast_cache)

    @torch.inference_mode()
    def run():
        with autocast:
            return model(x)
    return run


def graph_inference_case(name: str, size: int, batch: int, dtype: torch.dtype, device: torch.device):
    """``inference_case`` captured once in a CUDA graph and replayed: the GPU's time alone, without the host's work
    per launch (Python, the custom ops' dispatch, Triton's launcher), which an eager forward pays for every kernel.
    Two eager calls on a side stream come first: they run the scan's self-check, compile and autotune, so that the
    capture launches compiled, tuned kernels (``vim.kernels.warmup``). Returns a function that replays the graph and
    returns its output tensor, with ``peak_gib``: the model, its input and the graph's peak while capturing (the
    memory its replays use), without what other cases hold. CUDA only."""
    if device.type != 'cuda':
        raise ValueError(f'a CUDA graph needs a CUDA device, got {device}')
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    # no cast cache: weights cast during the warm-up, outside the graph, would be freed under it
    forward = inference_case(name, size, batch, dtype, device, cast_cache=False)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            forward()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward()
    torch.cuda.synchronize(device)
    peak_gib = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 30

    def run():
        graph.replay()
        return out
    # the graph reads the model's weights and the input where they lay at capture: they must live as long as it
    run.forward = forward
    run.peak_gib = peak_gib
    return run


def training_case(name: str, size: int, batch: int, dtype: torch.dtype, device: torch.device,
                  scan_recompute: bool = False, torchcompile: tuple[str | None, str | None] = (None, None)):
    """One AdamW step of ``name`` on a fixed batch; ``scan_recompute``: Vim's mixers run their conv, projections
    and scan again in the backward (``VisionMamba.set_scan_recompute``); ``torchcompile``: (backend, mode) for the
    model (the optimizer step stays eager)."""
    module = timm.create_model(name, img_size=size).to(device).train()
    if scan_recompute and hasattr(module, 'set_scan_recompute'):
        module.set_scan_recompute(True)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    model = _compiled(module, torchcompile, device, dtype)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def run():
        with autocast:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def _measure(names: list[str], make_case, size: int, batch: int, dtype: torch.dtype, device: torch.device,
             rounds: int, min_time: float) -> dict[str, dict]:
    cases = {n: make_case(n, size, batch, dtype, device) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names:
            times[n].append(time_fn(cases[n], device, min_time, warmup=2 if r == 0 else 1))
    out = {}
    for n in names:
        sec = statistics.median(times[n])
        out[n] = dict(img_per_s=batch / sec, latency_ms=sec * 1e3, peak_gib=_peak_gib(device, cases[n]),
                      rounds_ms=[t * 1e3 for t in times[n]])
    return out


def measure_pair(names: list[str], make_case, size: int, batch: int, dtype: torch.dtype, device: torch.device,
                 rounds: int, min_time: float) -> dict[str, dict]:
    """Alternate the models round by round; return median images/s and peak memory per model.

    Out of GPU memory, the models are measured one at a time, and a model that still does not fit is reported as
    ``{'oom': True}`` rather than ending the run.
    """
    try:
        return _measure(names, make_case, size, batch, dtype, device, rounds, min_time)
    except torch.OutOfMemoryError:
        pass
    finally:
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    out = {}
    for n in names:
        try:
            out.update(_measure([n], make_case, size, batch, dtype, device, rounds, min_time))
        except torch.OutOfMemoryError:
            out[n] = dict(oom=True, img_per_s=None)
        finally:
            if device.type == 'cuda':
                torch.cuda.empty_cache()
    return out


def _guarded_pair(names: list[str], make_case, size: int, batch: int, dtype: torch.dtype, device: torch.device,
                  rounds: int, min_time: float) -> dict[str, dict]:
    """``measure_pair`` for the optional modes (a CUDA-graph capture, a compiled model): a case that fails is
    recorded (``error``) and the run goes on with the next case."""
    try:
        return measure_pair(names, make_case, size, batch, dtype, device, rounds, min_time)
    except Exception as e:  # noqa: BLE001  (reported per case; the eager figures stand)
        message = (str(e).strip().splitlines() or [''])[0][:300]
        return {n: dict(error=f'{type(e).__name__}: {message}', img_per_s=None) for n in names}


def _speed(r: dict) -> str:
    if r.get('error'):
        return f'failed ({r["error"]})'
    return 'out of memory' if r.get('oom') else f'{r["img_per_s"]:.1f} img/s'


def plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple, list] = {}
    for r in results:
        if r['mode'] == 'inference' and r['img_per_s']:
            series.setdefault((r['model'], r['dtype']), []).append((r['img_size'], r['img_per_s']))
    for (model, dtype), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o', label=f'{model} {dtype}')
    ax.set_xlabel('image size (px)')
    ax.set_ylabel('images / s')
    ax.set_yscale('log')
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """--device, --backend, --threads and --glibc-malloc-defaults, as every model benchmark command takes them."""
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--backend', default=None, choices=['auto', *available_backends()],
                   help='Vim scan backend ($VIM_SCAN_BACKEND; default auto: triton on CUDA, the fused kernels on CPU)')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    p.add_argument('--glibc-malloc-defaults', action='store_true',
                   help="CPU: keep glibc's default heap thresholds (by default freed memory is kept for reuse, "
                        "for both models: vim.utils.retain_freed_memory)")


def apply_run_arguments(args: argparse.Namespace) -> tuple[torch.device, str]:
    """Applies ``add_run_arguments``' options (threads, scan backend, allocator setting); returns the device and the
    allocator line the reports record."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backend:
        os.environ['VIM_SCAN_BACKEND'] = args.backend
    device = torch.device(args.device)
    return device, malloc_setting(device, args.glibc_malloc_defaults)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.add_argument('--pairs', nargs='+', default=['tiny'], choices=['tiny', 'small', 'base'])
    p.add_argument('--img-sizes', nargs='+', type=int, default=[224])
    p.add_argument('--vim-only-sizes', nargs='*', type=int, default=[],
                   help='sizes to time Vim alone at, batch 1 (e.g. 4096)')
    p.add_argument('--dtypes', nargs='+', default=['fp32'], choices=sorted(DTYPES))
    p.add_argument('--batch-size', type=int, default=None, help='default: 1 on CPU, 64 (<=512 px) / 8 on CUDA')
    p.add_argument('--cuda-graph', action='store_true',
                   help='CUDA: also time each inference case captured in a CUDA graph (mode "inference-cuda-graph": '
                        'the GPU time without the host work per launch)')
    p.add_argument('--train', action='store_true', help='also time a training step at 224 px')
    p.add_argument('--train-batch-size', type=int, default=None, help='default: 8 on CPU, 128 on CUDA')
    p.add_argument('--train-img-size', type=int, default=224)
    p.add_argument('--scan-recompute', action='store_true',
                   help="training: Vim's mixers run their conv, projections and scan again in the backward instead "
                        'of keeping their outputs (less memory, one more forward scan a layer)')
    add_compile_arguments(p)
    p.add_argument('--flops', action='store_true', help='also count forward GFLOPs per image (on CPU)')
    p.add_argument('--scan', action='store_true', help='also time the scan alone against its floor '
                   '(tools/benchmark_scan.py with its defaults for the device)')
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--min-time', type=float, default=1.0, help='seconds per timing')
    p.add_argument('--out', type=Path, default=None, help='JSON path (default benchmarks/<device>-<date>.json)')
    args = p.parse_args(argv)

    device, malloc = apply_run_arguments(args)
    on_cuda = device.type == 'cuda'
    if args.cuda_graph and not on_cuda:
        p.error(f'--cuda-graph needs a CUDA device, got --device {args.device}')
    if args.torchcompile_mode and not args.torchcompile:
        p.error('--torchcompile-mode needs --torchcompile')
    compiled = (args.torchcompile, args.torchcompile_mode)
    started = dt.datetime.now(dt.timezone.utc)
    out = args.out or Path('benchmarks') / f'{device.type}-{started:%Y%m%d-%H%M}.json'
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    report = dict(
        date=started.isoformat(timespec='seconds'), device=device_name(device),
        command=' '.join(['python tools/benchmark.py'] + (argv if argv is not None else sys.argv[1:])),
        scan_backend=resolve_backend(None, torch.empty(0, device=device)),
        conv_backend=resolve_backend(None, torch.empty(0, device=device), op='conv'), torch=torch.__version__,
        timm=timm.__version__, python=platform.python_version(), malloc=malloc, scan_recompute=args.scan_recompute,
        torchcompile=args.torchcompile, torchcompile_mode=args.torchcompile_mode, complete=False, results=results,
        scan=None)

    def save() -> None:
        atomic_write(out, json.dumps(report, indent=1).encode())

    # the optional inference modes, each timed after the eager case of the same size: (mode, label, case maker)
    optional = []
    if args.cuda_graph:
        optional.append(('inference-cuda-graph', 'CUDA graph', graph_inference_case))
    if args.torchcompile:
        optional.append(('inference-compiled', 'compiled', partial(inference_case, torchcompile=compiled)))

    for size_name in args.pairs:
        names = [f'vim_{size_name}_patch16_224', f'deit_{size_name}_patch16_224']
        for dtype_name in args.dtypes:
            for size in args.img_sizes:
                batch = args.batch_size or ((64 if size <= 512 else 8) if on_cuda else 1)
                res = measure_pair(names, inference_case, size, batch, DTYPES[dtype_name], device, args.rounds,
                                   args.min_time)
                for n, r in res.items():
                    if args.flops:
                        r['gflops_per_img'] = count_gflops(n, size)
                    results.append(dict(mode='inference', model=n, img_size=size, batch=batch, dtype=dtype_name, **r))
                save()
                print(f'{size_name:5s} {dtype_name} {size:5d}px b{batch:<3d} ' + '  '.join(
                    f'{n}: {_speed(r)}' for n, r in res.items()), flush=True)
                for mode, label, make_case in optional:
                    res = _guarded_pair(names, make_case, size, batch, DTYPES[dtype_name], device, args.rounds,
                                        args.min_time)
                    results.extend(dict(mode=mode, model=n, img_size=size, batch=batch, dtype=dtype_name, **r)
                                   for n, r in res.items())
                    save()
                    print(f'{size_name:5s} {dtype_name} {size:5d}px b{batch:<3d} {label} ' + '  '.join(
                        f'{n}: {_speed(r)}' for n, r in res.items()), flush=True)
            for size in args.vim_only_sizes:
                res = measure_pair(names[:1], inference_case, size, 1, DTYPES[dtype_name], device, args.rounds,
                                   args.min_time)
                results.append(dict(mode='inference', model=names[0], img_size=size, batch=1, dtype=dtype_name,
                                    **res[names[0]]))
                save()
                print(f'{size_name:5s} {dtype_name} {size:5d}px b1   {names[0]}: {_speed(res[names[0]])}', flush=True)
        if args.train:
            batch = args.train_batch_size or (128 if on_cuda else 8)
            dtype = torch.bfloat16 if on_cuda else torch.float32
            size = args.train_img_size
            case = partial(training_case, scan_recompute=args.scan_recompute)
            modes = [('train', '', case)]
            if args.torchcompile:
                modes.append(('train-compiled', 'compiled ', partial(case, torchcompile=compiled)))
            for mode, label, make_case in modes:
                measure = measure_pair if mode == 'train' else _guarded_pair
                res = measure(names, make_case, size, batch, dtype, device, args.rounds, args.min_time)
                results.extend(dict(mode=mode, model=n, img_size=size, batch=batch,
                                    dtype='bf16' if on_cuda else 'fp32', **r) for n, r in res.items())
                save()
                print(f'{size_name:5s} train {label}{size}px b{batch} ' + '  '.join(
                    f'{n}: {_speed(r)}' for n, r in res.items()), flush=True)

    print('\nVim / DeiT images-per-second ratio (same run):')
    print(f'{"pair":6s} {"mode":20s} {"dtype":5s} {"size":>5s} {"vim img/s":>10s} {"deit img/s":>10s} {"ratio":>6s}')
    by_key = {(r['mode'], r['model'], r['dtype'], r['img_size']): r for r in results}
    for r in results:
        deit = by_key.get((r['mode'], r['model'].replace('vim_', 'deit_'), r['dtype'], r['img_size']))
        if not r['model'].startswith('vim_') or deit is None:
            continue
        fmt = lambda x: (f'{x["img_per_s"]:10.1f}' if x['img_per_s'] else  # noqa: E731
                         f'{"OOM" if x.get("oom") else "failed":>10s}')
        if r['img_per_s'] and deit['img_per_s']:
            r['ratio_to_deit'] = r['img_per_s'] / deit['img_per_s']
        ratio = f'{r["ratio_to_deit"]:6.2f}' if 'ratio_to_deit' in r else f'{"-":>6s}'
        pair = r['model'].split('_')[1]
        print(f'{pair:6s} {r["mode"]:20s} {r["dtype"]:5s} {r["img_size"]:5d} {fmt(r)} {fmt(deit)} {ratio}')

    if args.scan:
        shapes = [(8, 6085), (128, 197), (1, 16385)] if on_cuda else [(1, 197)]
        report['scan'] = scan_benchmark.run(device, args.dtypes, shapes, 384, 16,
                                            scan_benchmark.default_backends(device), args.min_time, None, 1.98,
                                            1 << 30 if on_cuda else 1 << 27)
    report['complete'] = True
    save()
    png = out.with_suffix('.png')
    print(f'\nwrote {out}' + (f' and {png}' if plot(results, png) else ' (install matplotlib for a PNG plot)'))
    return 0
