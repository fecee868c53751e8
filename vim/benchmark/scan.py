"""The mixer's ops alone: time, bytes moved, exp() count, and the floor they imply, per backend. The bidirectional
scan, and the two-branch causal conv + silu in front of it (rows under 'conv').

    python tools/benchmark_scan.py --device cuda --dtypes bf16 fp32      # Vim-Ti's d_inner 384, N 16
    python tools/benchmark.py --scan ...                                 # the same rows inside the model benchmark

Floor of a kernel = max(bytes moved / copy bandwidth, exp count / exp rate). The copy bandwidth is measured in the
same run (a large device-to-device tensor copy); the exp rate is ``--exp-rate`` if given, else, on CUDA, SMs x 16
exp2 per clock x ``--clock-ghz`` (1.98, an H100 SXM's boost clock: shared/ANCHORS.md), else, on CPU, measured in
the same run by :func:`vim.kernels.cpu.probe.exp_rate` (the fused kernels' fp32 exp2 on torch.get_num_threads()
threads), or unknown (floor from bytes only) where those kernels cannot build. The report says which
(``exp_rate_source``).
Bytes count what an ideal fused kernel must touch once: the inputs and the output in their dtypes (forward),
plus the output gradient read and the input gradients written (backward). exp count: one per (direction, batch,
channel, token, state), forward and again in the backward's recomputation. The conv's floor is its bytes: x read and
both branches written (forward); x and both branches' gradients read, x's gradient written (backward).
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vim.kernels import available_backends, bidirectional_conv_silu, bidirectional_scan
from vim.kernels.cpu import cpu_backend_status
from vim.kernels.cpu.probe import exp_rate as cpu_exp_rate
from vim.utils import atomic_write, retain_freed_memory

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def _time(fn, device: torch.device, min_time: float, profile: bool = False) -> float:
    """Seconds per call of ``fn`` after a warm-up call (which autotunes the Triton kernels). ``profile``: one more call
    after the warm-up inside a CUDA profiler range, for ``ncu --profile-from-start off`` (steady-state launches only,
    not the autotuner's trial runs)."""
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        if profile:
            torch.cuda.profiler.start()
            fn()
            torch.cuda.synchronize(device)
            torch.cuda.profiler.stop()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        if time.perf_counter() - start >= min_time:
            return (time.perf_counter() - start) / calls


def _device_ms(fn, device: torch.device, calls: int = 3) -> tuple[float, dict[str, float]]:
    """Milliseconds per call that the GPU spends in ``fn``'s kernels (torch.profiler's device time, after
    :func:`_time`'s warm-up), in all and per kernel name; the wall time above it is host work that leaves the GPU
    idle (launches, the split plan, the synchronisation after each timed call). CUDA only."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
    per_kernel = {e.key: e.self_device_time_total / 1e3 / calls for e in prof.key_averages()
                  if e.self_device_time_total > 0}
    return sum(per_kernel.values()), per_kernel


def _device_fields(fwd, fwd_bwd, device: torch.device, profile: bool) -> dict:
    """fwd_device_ms, bwd_device_ms (forward + backward less the forward alone) and each kernel's share, per call;
    None off CUDA, and under Nsight Compute (--cuda-profile), with which torch.profiler's CUPTI session would
    compete."""
    if profile or device.type != 'cuda':
        return dict(fwd_device_ms=None, bwd_device_ms=None)
    k_fwd, fwd_kernels = _device_ms(fwd, device)
    k_fb, fwd_bwd_kernels = _device_ms(fwd_bwd, device)
    return dict(fwd_device_ms=k_fwd, bwd_device_ms=k_fb - k_fwd, fwd_kernels_ms=fwd_kernels,
                fwd_bwd_kernels_ms=fwd_bwd_kernels)


def host_profile(fn, device: torch.device, calls: int, top: int = 12) -> list[dict]:
    """Where the host's time per call of ``fn`` goes: cProfile over ``calls`` calls (after :func:`_time`'s warm-up),
    the ``top`` functions by their own time, each with its own and cumulative microseconds and its calls per call.
    On CUDA the wall time above the kernels' (``fwd_ms`` against ``fwd_device_ms``) is this host work wherever the
    GPU waits for it; the calls run unsynchronised, as a model's layers do, and one synchronisation ends them."""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (primitive calls, calls, own s, cumulative s, callers)}
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return [dict(function=f'{Path(file).name}:{line}({name})', own_us=own / calls * 1e6,
                 cumulative_us=cum / calls * 1e6, calls=n / calls)
            for (file, line, name), (_, n, own, cum, _) in rows]


def _host_fields(fwd, fwd_bwd, device: torch.device, calls: int) -> dict:
    if not calls:
        return {}
    return dict(fwd_host_profile=host_profile(fwd, device, calls),
                fwd_bwd_host_profile=host_profile(fwd_bwd, device, calls))


def copy_bandwidth(device: torch.device, nbytes: int, min_time: float) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _time(lambda: dst.copy_(src), device, min_time)


def scan_inputs(batch: int, dim: int, dstate: int, seqlen: int, dtype: torch.dtype, device: torch.device):
    """The scan's inputs in the layouts the mixer (vim.layers.mixer) passes on a GPU: u and delta direction-major
    (the conv's output and dt_proj's), B and C slices of a direction-major token-major x_dbl, z a transposed slice of
    in_proj's (batch, seqlen, 2 * dim) output."""
    g = torch.Generator(device=device).manual_seed(0)  # drawn on the device: a GPU run's inputs take no CPU time

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)
    u = r(2, batch, seqlen, dim).permute(1, 0, 3, 2)
    delta = r(2, batch, seqlen, dim, scale=0.5).permute(1, 0, 3, 2)
    x_dbl = r(2, batch, seqlen, 2 * dstate).permute(1, 0, 3, 2)
    B, C = x_dbl[:, :, :dstate], x_dbl[:, :, dstate:]
    z = r(batch, seqlen, 2 * dim).transpose(1, 2)[:, dim:]
    A = -torch.rand(2, dim, dstate, generator=g, device=device) * 4 - 0.1
    D, bias = torch.randn(2, dim, generator=g, device=device), torch.randn(2, dim, generator=g, device=device) * 0.5
    return u, delta, A, B, C, D, z, bias


def _scan_fn(backend: str, chunk: int | None) -> Callable:
    """The scan as the mixer calls it, or, for ``triton`` with ``chunk``, the Triton op with that chunk size (the
    spacing of the states the forward saves for the backward)."""
    if chunk is not None and backend == 'triton':
        from vim.kernels.triton import bidirectional_scan_triton
        return functools.partial(bidirectional_scan_triton, chunk_size=chunk)
    return functools.partial(bidirectional_scan, backend=backend)


def measure(backend: str, batch: int, dim: int, dstate: int, seqlen: int, dtype: torch.dtype,
            device: torch.device, min_time: float, profile: bool = False, chunk: int | None = None,
            host_calls: int = 0) -> dict:
    """One scan row; ``host_calls``: also profile the host over that many calls (:func:`host_profile`)."""
    scan = _scan_fn(backend, chunk)
    inputs = scan_inputs(batch, dim, dstate, seqlen, dtype, device)
    u, delta, A, B, C, D, z, bias = inputs
    elt = torch.finfo(dtype).bits // 8
    act_bytes = sum(t.numel() for t in (u, delta, B, C, z)) * elt  # activations, in their dtype
    param_bytes = sum(t.numel() for t in (A, D, bias)) * 4  # fp32
    out_bytes = batch * dim * seqlen * elt
    fwd_bytes = act_bytes + param_bytes + out_bytes
    bwd_bytes = fwd_bytes + out_bytes + act_bytes + param_bytes  # + dy read, + gradients of every input
    exps = 2 * batch * dim * seqlen * dstate

    def fwd():
        with torch.no_grad():
            scan(*inputs)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    # the output's gradient as out_proj's backward hands it to the mixer: channel stride 1
    grad = torch.randn(batch, seqlen, dim, device=device, dtype=dtype).transpose(1, 2)

    def fwd_bwd():  # gradients returned, not accumulated into .grad (an add per input and call that no step pays)
        torch.autograd.grad(scan(*leaves), leaves, grad)
    t_fwd = _time(fwd, device, min_time, profile)
    t_fb = _time(fwd_bwd, device, min_time, profile)
    t_bwd = max(t_fb - t_fwd, 1e-12)
    return dict(backend=backend, batch=batch, dim=dim, dstate=dstate, seqlen=seqlen, dtype=str(dtype).split('.')[-1],
                **({} if chunk is None or backend != 'triton' else dict(chunk=chunk)),
                fwd_ms=t_fwd * 1e3, bwd_ms=t_bwd * 1e3, **_device_fields(fwd, fwd_bwd, device, profile),
                **_host_fields(fwd, fwd_bwd, device, host_calls), fwd_bytes=fwd_bytes, bwd_bytes=bwd_bytes,
                fwd_exps=exps, bwd_exps=exps, fwd_gbps=fwd_bytes / t_fwd / 1e9, bwd_gbps=bwd_bytes / t_bwd / 1e9,
                fwd_exp_per_s=exps / t_fwd, bwd_exp_per_s=exps / t_bwd)


def conv_inputs(batch: int, dim: int, seqlen: int, width: int, dtype: torch.dtype, device: torch.device):
    """in_proj's output xz (batch, seqlen, 2 * dim), whose transposed slice ``xz.transpose(1, 2)[:, :dim]`` is the
    conv's x as the mixer passes it, and the conv's weight (2, dim, width) and bias (2, dim) in fp32."""
    g = torch.Generator(device=device).manual_seed(0)
    xz = torch.randn(batch, seqlen, 2 * dim, generator=g, device=device).to(dtype)
    weight = torch.randn(2, dim, width, generator=g, device=device) / width
    return xz, weight, torch.randn(2, dim, generator=g, device=device)


def measure_conv(backend: str, batch: int, dim: int, seqlen: int, width: int, dtype: torch.dtype,
                 device: torch.device, min_time: float, profile: bool = False, host_calls: int = 0) -> dict:
    """One conv row; ``host_calls`` as :func:`measure`'s."""
    xz, weight, bias = conv_inputs(batch, dim, seqlen, width, dtype, device)
    x = xz.transpose(1, 2)[:, :dim]
    elt = torch.finfo(dtype).bits // 8
    tokens = batch * dim * seqlen
    params = weight.numel() * 4 + bias.numel() * 4
    fwd_bytes = 3 * tokens * elt + params
    bwd_bytes = 4 * tokens * elt + 2 * params

    def fwd():
        with torch.no_grad():
            bidirectional_conv_silu(x, weight, bias, backend=backend)
    # x a leaf with the slice's strides: the op's gradient alone, not autograd's for the slice of xz (which zero-fills
    # all of xz's gradient and copies x's into it: in the fifth H100 run as long as the conv's own kernel)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    # u's gradient as x_proj's and the scan's backward hand it back in the mixer: channel stride 1
    grad = torch.randn(batch, 2, seqlen, dim, device=device, dtype=dtype).transpose(2, 3)

    def fwd_bwd():
        torch.autograd.grad(bidirectional_conv_silu(*leaves, backend=backend), leaves, grad)
    t_fwd = _time(fwd, device, min_time, profile)
    t_bwd = max(_time(fwd_bwd, device, min_time, profile) - t_fwd, 1e-12)
    return dict(backend=backend, batch=batch, dim=dim, width=width, seqlen=seqlen, dtype=str(dtype).split('.')[-1],
                fwd_ms=t_fwd * 1e3, bwd_ms=t_bwd * 1e3, **_device_fields(fwd, fwd_bwd, device, profile),
                **_host_fields(fwd, fwd_bwd, device, host_calls), fwd_bytes=fwd_bytes, bwd_bytes=bwd_bytes,
                fwd_gbps=fwd_bytes / t_fwd / 1e9, bwd_gbps=bwd_bytes / t_bwd / 1e9,
                fwd_exps=2 * tokens, bwd_exps=2 * tokens)


def add_floors(row: dict, copy_bps: float, exp_rate: float | None) -> dict:
    for phase in ('fwd', 'bwd'):
        floor = row[f'{phase}_bytes'] / copy_bps
        if exp_rate:
            floor = max(floor, row[f'{phase}_exps'] / exp_rate)
        row[f'{phase}_floor_ms'] = floor * 1e3
        row[f'{phase}_x_floor'] = row[f'{phase}_ms'] / row[f'{phase}_floor_ms']
        if row.get(f'{phase}_device_ms') is not None:
            row[f'{phase}_device_x_floor'] = row[f'{phase}_device_ms'] / row[f'{phase}_floor_ms']
    return row


def run(device: torch.device, dtypes: list[str], shapes: list[tuple[int, int]], dim: int, dstate: int,
        backends: list[str], min_time: float, exp_rate: float | None, clock_ghz: float,
        copy_bytes: int, on_row: Callable[[dict], None] | None = None, profile: bool = False,
        triton_chunk: int | None = None, host_calls: int = 0) -> dict:
    """Rows of the scan and the conv per (backend, dtype, shape), with the copy bandwidth and exp rate behind their
    floors. ``on_row`` gets the partial result after every shape (``complete`` False until the last), so that a run
    cut off by a time limit keeps what it measured. ``profile``: see :func:`_time`. ``triton_chunk``: the Triton
    scan's chunk size (default: the op's). ``host_calls``: profile the host over that many calls of each op
    (:func:`host_profile`) and print the top functions of the forward's."""
    source = '--exp-rate' if exp_rate is not None else None
    if exp_rate is None and device.type == 'cuda':
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        exp_rate = sms * 16 * clock_ghz * 1e9
        source = f'{sms} SMs x 16 exp2 per clock x {clock_ghz} GHz'
    elif exp_rate is None and device.type == 'cpu' and cpu_backend_status()[0]:
        exp_rate = cpu_exp_rate(min_time=max(min_time, 0.05))
        source = f'measured: vim.kernels.cpu.probe.exp_rate() on {torch.get_num_threads()} threads'
    copy_bps = copy_bandwidth(device, copy_bytes, min_time)
    rows, conv_rows = [], []
    result = dict(copy_gbps=copy_bps / 1e9, exp_rate=exp_rate, exp_rate_source=source, complete=False, scan=rows,
                  conv=conv_rows)
    for backend in backends:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for batch, seqlen in shapes:
                scan = add_floors(measure(backend, batch, dim, dstate, seqlen, dtype, device, min_time, profile,
                                          triton_chunk, host_calls), copy_bps, exp_rate)
                conv = add_floors(measure_conv(backend, batch, dim, seqlen, 4, dtype, device, min_time, profile,
                                               host_calls), copy_bps, exp_rate)
                rows.append(scan)
                conv_rows.append(conv)
                for op, row in (('scan', scan), ('conv', conv)):
                    kernels = ('' if row.get('fwd_device_ms') is None else
                               f' [GPU busy: fwd {row["fwd_device_ms"]:.3f} ms ({row["fwd_device_x_floor"]:.1f}x), '
                               f'bwd {row["bwd_device_ms"]:.3f} ms ({row["bwd_device_x_floor"]:.1f}x)]')
                    print(f'{op} {backend:9s} {dtype_name} {batch}x{seqlen}: fwd {row["fwd_ms"]:.3f} ms '
                          f'({row["fwd_gbps"]:.0f} GB/s, {row["fwd_x_floor"]:.1f}x floor), bwd {row["bwd_ms"]:.3f} '
                          f'ms ({row["bwd_gbps"]:.0f} GB/s, {row["bwd_x_floor"]:.1f}x floor){kernels}', flush=True)
                    for f in row.get('fwd_host_profile', [])[:6]:
                        print(f'    host, fwd: {f["own_us"]:8.1f} us own {f["cumulative_us"]:8.1f} us cumulative '
                              f'{f["calls"]:5.1f} calls  {f["function"]}', flush=True)
                if on_row is not None:
                    on_row(result)
    result['complete'] = True
    return result


def malloc_setting(device: torch.device, glibc_defaults: bool) -> str:
    """Applies the benchmarks' allocator setting for ``device`` (on CPU, unless ``glibc_defaults``: freed memory kept
    for reuse, :func:`vim.utils.retain_freed_memory`) and returns the line the reports record as ``malloc``."""
    if device.type == 'cpu' and not glibc_defaults and retain_freed_memory():
        return 'freed memory kept for reuse (vim.utils.retain_freed_memory)'
    return 'glibc defaults'


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    model = platform.processor() or 'cpu'
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                model = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    return f'{model}, {torch.get_num_threads()} threads'


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def default_backends(device: torch.device) -> list[str]:
    """The backends that run on ``device``: every one on CUDA, the reference and the fused CPU kernels on CPU."""
    if device.type == 'cuda':
        return [b for b in available_backends() if b != 'cpu']
    return [b for b in available_backends() if b in ('reference', 'cpu')]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--dtypes', nargs='+', default=['fp32'], choices=sorted(DTYPES))
    p.add_argument('--shapes', nargs='+', default=None,
                   help='BATCHxSEQLEN, default 8x6085 128x197 1x16385 on CUDA, 1x197 on CPU')
    p.add_argument('--dim', type=int, default=384, help="d_inner (Vim-Ti: 384)")
    p.add_argument('--dstate', type=int, default=16)
    p.add_argument('--backends', nargs='+', default=None)
    p.add_argument('--min-time', type=float, default=1.0)
    p.add_argument('--exp-rate', type=float, default=None, help='exp() per second of the device')
    p.add_argument('--clock-ghz', type=float, default=1.98)
    p.add_argument('--out', type=Path, default=None, help='JSON output, rewritten (atomically) after every shape: '
                   "'complete' is false in a run that was cut off")
    p.add_argument('--glibc-malloc-defaults', action='store_true',
                   help="CPU: keep glibc's default heap thresholds (by default freed memory is kept for reuse, as in "
                        "tools/benchmark.py: vim.utils.retain_freed_memory)")
    p.add_argument('--cuda-profile', action='store_true',
                   help='CUDA: run each timed op once more after its warm-up inside a profiler range, for '
                        '`ncu --profile-from-start off` (steady-state kernels, not the autotuner\'s trials)')
    p.add_argument('--triton-chunk', type=int, default=None, choices=[2, 4, 8],
                   help="the Triton scan's chunk size: the forward saves each direction's state every CHUNK tokens "
                        "for the backward (default: the op's, 8); 4 doubles that memory")
    p.add_argument('--host-profile', type=int, default=0, metavar='CALLS',
                   help="also profile the host's work (cProfile) over CALLS calls of each op, forward and forward + "
                        "backward: the top functions by their own time go to the JSON rows (fwd_host_profile, "
                        "fwd_bwd_host_profile), the forward's to the console")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    malloc = malloc_setting(device, args.glibc_malloc_defaults)
    shapes = args.shapes or (['8x6085', '128x197', '1x16385'] if device.type == 'cuda' else ['1x197'])
    shapes = [tuple(int(v) for v in s.lower().split('x')) for s in shapes]
    copy_bytes = 1 << 30 if device.type == 'cuda' else 1 << 27
    started = dt.datetime.now(dt.timezone.utc)
    report = dict(date=started.isoformat(timespec='seconds'), device=device_name(device), torch=torch.__version__,
                  triton=_triton_version(), malloc=malloc,
                  command=' '.join(['python tools/benchmark_scan.py'] + (argv if argv is not None else sys.argv[1:])))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(part: dict) -> None:
        if args.out:
            atomic_write(args.out, json.dumps({**report, **part}, indent=1).encode())

    report.update(run(device, args.dtypes, shapes, args.dim, args.dstate, args.backends or default_backends(device),
                      args.min_time, args.exp_rate, args.clock_ghz, copy_bytes, on_row=save,
                      profile=args.cuda_profile, triton_chunk=args.triton_chunk, host_calls=args.host_profile))
    print(f'copy bandwidth {report["copy_gbps"]:.0f} GB/s; exp rate '
          + (f'{report["exp_rate"]:.3g}/s ({report["exp_rate_source"]})' if report['exp_rate']
             else 'unknown (floor from bytes only)'))
    save(report)
    return 0
