"""Compile the Triton kernels ahead of time for the H100 (sm_90) without a GPU, and read what ptxas made of them.

Used by the static report (report.py) and the compile tests. Must run in a process without TRITON_INTERPRET (under
the interpreter ``@triton.jit`` gives interpreted functions, which cannot be compiled). Argument values follow
what the model passes; integers are specialised as Triton specialises them at launch (1 -> constant, multiple of
16 -> divisibility hint), except ``do_not_specialize`` ones.
"""
from __future__ import annotations

import contextlib
import io
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget

from .carries import watch_loop_carries

__all__ = ['KernelSpec', 'compile_kernel', 'sass_of', 'scan_arguments', 'conv_arguments', 'TYPES']

TARGET = GPUTarget('cuda', 90, 32)
TYPES = {torch.float32: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}


@dataclass
class KernelSpec:
    """One autotuned kernel: its autotuner, every config it may run, and how its loop relates to the work.

    loop: 'token' (an iteration is one token of each of the thread's channels), 'state' (one state of the CHUNK
    tokens a thread holds, inside a chunk loop), 'segment' (one segment boundary), 'conv' (UNROLL tokens of the
    thread's channels, no state axis) or 'none' (straight-line code: the program's whole tile).
    """
    name: str
    autotuner: object
    configs: list
    loop: str
    constexprs: dict


def scan_arguments(dtype: torch.dtype, layout: str, batch: int, dim: int, dstate: int, seqlen: int,
                   seg_len: int, n_seg: int, rank: int = 12) -> dict:
    """Values of the scan kernels' arguments by name: '*dtype' for pointers, ints for sizes and strides.
    layout 'mixer': the model's views (B, C slices of x_dbl, z a transposed slice of in_proj's output)."""
    e = lambda *s, dt=dtype: torch.empty(*s, device='meta', dtype=dt)  # noqa: E731
    f32 = torch.float32
    if layout == 'contiguous':
        x = dict(u=e(batch, 2, dim, seqlen), delta=e(batch, 2, dim, seqlen), A=e(2, dim, dstate, dt=f32),
                 B=e(batch, 2, dstate, seqlen), C=e(batch, 2, dstate, seqlen), D=e(2, dim, dt=f32),
                 z=e(batch, dim, seqlen), delta_bias=e(2, dim, dt=f32))
    else:
        x_dbl = e(batch, 2, rank + 2 * dstate, seqlen)
        x = dict(u=e(batch, 2, dim, seqlen), delta=e(batch, 2, dim, seqlen), A=e(2, dim, dstate, dt=f32),
                 B=x_dbl[:, :, rank:rank + dstate], C=x_dbl[:, :, rank + dstate:], D=e(2, dim, dt=f32),
                 z=e(batch, seqlen, 2 * dim).transpose(1, 2)[:, dim:], delta_bias=e(2, dim, dt=f32))
    x['gout'] = e(batch, dim, seqlen)
    ptr = lambda t: '*' + TYPES[t.dtype]  # noqa: E731
    args = {f'{n}_ptr': ptr(t) for n, t in x.items()}
    args.update(bias_ptr=ptr(x['delta_bias']), batch=batch, seqlen=seqlen, dim=dim, dstate=dstate, seg_len=seg_len,
                n_seg=n_seg, s_h_n=1, s_h_d=dstate, out_ptr=ptr(x['u']), y1_ptr='*fp32', hseg_ptr='*fp32',
                dtsum_ptr='*fp32', bc_ptr='*fp32', states_ptr='*fp32', gu_ptr=ptr(x['u']), gdelta_ptr=ptr(x['delta']),
                rseg_ptr='*fp32', carry_ptr='*fp32', gbc_ptr='*fp32', s_c_d=1, s_g_d=1)
    for g in ('gA', 'gB', 'gC', 'gD', 'gbias'):
        args[f'{g}_ptr'] = '*fp32'
    args.update(ysum_ptr=ptr(x['u']), y_ptr=ptr(x['u']), gz_ptr=ptr(x['z']))
    prefixes = dict(u='s_u', delta='s_dt', A='s_A', B='s_B', C='s_C', D='s_D', delta_bias='s_bias', z='s_z',
                    gout='s_go')
    axes = dict(u='bkdl', delta='bkdl', A='kdn', B='bknl', C='bknl', D='kd', delta_bias='kd', z='bdl', gout='bdl')
    for name, prefix in prefixes.items():
        args.update({f'{prefix}_{a}': s for a, s in zip(axes[name], x[name].stride())})
    return args


def conv_arguments(dtype: torch.dtype, layout: str, batch: int, dim: int, seqlen: int, width: int = 4) -> dict:
    """As ``scan_arguments``, for the conv kernels: x is in_proj's transposed slice ('mixer') or contiguous."""
    e = lambda *s, dt=dtype: torch.empty(*s, device='meta', dtype=dt)  # noqa: E731
    x = e(batch, seqlen, 2 * dim).transpose(1, 2)[:, dim:] if layout == 'mixer' else e(batch, dim, seqlen)
    w, b, gout = e(2, dim, width, dt=torch.float32), e(2, dim, dt=torch.float32), e(batch, 2, dim, seqlen)
    t = '*' + TYPES[dtype]
    args = dict(x_ptr=t, w_ptr='*fp32', b_ptr='*fp32', out_ptr=t, gout_ptr=t, gx_ptr=t, gw_ptr='*fp32',
                gb_ptr='*fp32', batch=batch, seqlen=seqlen, dim=dim, block_l=64)
    for prefix, axes, ten in (('s_x', 'bdl', x), ('s_w', 'kdj', w), ('s_b', 'kd', b), ('s_go', 'bkdl', gout)):
        args.update({f'{prefix}_{a}': st for a, st in zip(axes, ten.stride())})
    return args


def compile_kernel(spec: KernelSpec, config: triton.Config, values: dict) -> dict:
    """Compile ``spec``'s kernel with ``config`` for sm_90. Returns registers, spills (ptxas's report), shared
    memory, the SASS text, and the loop variables Triton's frontend failed to carry (``watch_loop_carries``)."""
    fn = spec.autotuner.fn
    constexprs = {k: v for k, v in {**spec.constexprs, **config.kwargs}.items() if k in fn.arg_names}
    signature, attrs = {}, {}
    for i, (param, name) in enumerate(zip(fn.params, fn.arg_names)):
        if name in constexprs:
            signature[name] = 'constexpr'
            continue
        value = values[name]
        if isinstance(value, str):
            signature[name] = value
            attrs[(i,)] = [['tt.divisibility', 16]]
        elif param.do_not_specialize:
            signature[name] = 'i32'
        elif value == 1:
            signature[name] = 'constexpr'
            constexprs[name] = 1
        else:
            signature[name] = 'i32'
            if value % 16 == 0:
                attrs[(i,)] = [['tt.divisibility', 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its register/spill report
    log, lost = io.StringIO(), []
    with contextlib.redirect_stdout(log), watch_loop_carries(lost):
        kernel = triton.compile(src, target=TARGET, options=dict(
            num_warps=config.num_warps, num_stages=config.num_stages, maxnreg=config.maxnreg))
    log = log.getvalue()
    regs = re.search(r'Used (\d+) registers', log)
    spills = re.search(r'(\d+) bytes spill stores, (\d+) bytes spill loads', log)
    return dict(registers=int(regs.group(1)), spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
                shared=kernel.metadata.shared, sass=sass_of(kernel.asm['cubin']), lost_carries=lost)


def sass_of(cubin: bytes) -> str:
    """cuobjdump -sass of a cubin (Triton's bundled cuobjdump), with its addresses (branch targets are absolute)."""
    with tempfile.NamedTemporaryFile(suffix='.cubin') as f:
        f.write(cubin)
        f.flush()
        return subprocess.check_output([triton.knobs.nvidia.cuobjdump.path, '-sass', f.name], text=True,
                                       stderr=subprocess.DEVNULL)
