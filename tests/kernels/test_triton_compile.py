"""Compile every kernel (scan and conv), for every autotune config, ahead of time for the H100 (sm_90): no GPU needed.

Catches what the interpreter cannot: lowering failures, and register spills (ptxas's own report). Runs in a
subprocess without TRITON_INTERPRET (set by conftest when CUDA is absent, it would turn @triton.jit into the
interpreter) and with a private Triton cache (a cache hit would skip ptxas and its report).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip('triton')

# Argument values follow what the model passes at 224 px (Vim-Ti: d_inner 384, d_state 16, dt_rank 12, 197 tokens):
# 'mixer' takes the strides of the mixer's views, 'contiguous' those of fresh tensors. Integers are specialised as
# Triton specialises them at launch (1 -> constant, multiple of 16 -> divisibility hint), except do_not_specialize.
_SCRIPT = r'''
import contextlib, io, json, re, sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from vim.kernels.triton import DEFAULT_CHUNK, bwd, conv, fwd

triton.knobs.nvidia.dump_ptxas_log = True
TARGET = GPUTarget('cuda', 90, 32)
batch, dim, dstate, rank, seqlen = 8, 384, 16, 12, 197
TYPES = {torch.float32: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}


def views(dtype, layout):
    e = lambda *s, dt=dtype: torch.empty(*s, device='meta', dtype=dt)
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
    return x


def arguments(kernel, x):
    """Kernel argument name -> value: '*dtype' for pointers, ints for sizes and strides."""
    ptr = lambda t: '*' + TYPES[t.dtype]
    args = {f'{n}_ptr': ptr(t) for n, t in x.items()}
    args.update(bias_ptr=ptr(x['delta_bias']), seqlen=seqlen, dim=dim, dstate=dstate,
                out_ptr='*fp32', states_ptr='*fp32', gu_ptr=ptr(x['u']), gdelta_ptr=ptr(x['delta']))
    for g in ('gA', 'gB', 'gC', 'gD', 'gbias', 'gz'):
        args[f'{g}_ptr'] = '*fp32'
    prefixes = dict(u='s_u', delta='s_dt', A='s_A', B='s_B', C='s_C', D='s_D', delta_bias='s_bias', z='s_z',
                    gout='s_go')
    axes = dict(u='bkdl', delta='bkdl', A='kdn', B='bknl', C='bknl', D='kd', delta_bias='kd', z='bdl', gout='bdl')
    for name, prefix in prefixes.items():
        args.update({f'{prefix}_{a}': s for a, s in zip(axes[name], x[name].stride())})
    return {n: args[n] for n in kernel.arg_names if n in args}


def conv_arguments(kernel, dtype, layout):
    """As ``arguments``, for the conv kernels: x is in_proj's transposed slice ('mixer') or contiguous."""
    e = lambda *s, dt=dtype: torch.empty(*s, device='meta', dtype=dt)
    x = e(batch, seqlen, 2 * dim).transpose(1, 2)[:, dim:] if layout == 'mixer' else e(batch, dim, seqlen)
    w, b, gout = e(2, dim, 4, dt=torch.float32), e(2, dim, dt=torch.float32), e(batch, 2, dim, seqlen)
    args = dict(x_ptr='*' + TYPES[dtype], w_ptr='*fp32', b_ptr='*fp32', out_ptr='*' + TYPES[dtype],
                gout_ptr='*' + TYPES[dtype], gx_ptr='*' + TYPES[dtype], gw_ptr='*fp32', gb_ptr='*fp32',
                seqlen=seqlen, dim=dim)
    for prefix, axes, t in (('s_x', 'bdl', x), ('s_w', 'kdj', w), ('s_b', 'kd', b), ('s_go', 'bkdl', gout)):
        args.update({f'{prefix}_{a}': st for a, st in zip(axes, t.stride())})
    return {n: args[n] for n in kernel.arg_names if n in args}


def compile_one(autotuner, config, values):
    fn = autotuner.fn
    constexprs = dict(DELTA_SOFTPLUS=True, STORE_STATES=True, CHUNK=DEFAULT_CHUNK, WIDTH=4,
                      BLOCK_L=conv.CONV_BLOCK_L, BLOCK_N=triton.next_power_of_2(dstate), **config.kwargs)
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
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
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(src, target=TARGET, options=dict(
            num_warps=config.num_warps, num_stages=config.num_stages, maxnreg=config.maxnreg))
    log = log.getvalue()
    regs = re.search(r'Used (\d+) registers', log)
    spills = re.search(r'(\d+) bytes spill stores, (\d+) bytes spill loads', log)
    return dict(registers=int(regs.group(1)), spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
                shared=kernel.metadata.shared, cubin_bytes=len(kernel.asm['cubin']))


SCAN = (fwd._bidirectional_scan_fwd_kernel, bwd._bidirectional_scan_bwd_kernel)
CONV = (conv._bidirectional_conv_fwd_kernel, conv._bidirectional_conv_bwd_kernel)
for autotuner in SCAN + CONV:
    for config in autotuner.configs:
        for dtype, layout in ((torch.bfloat16, 'mixer'), (torch.float32, 'contiguous')):
            result = dict(kernel=autotuner.fn.__name__, config=str(config), dtype=TYPES[dtype], layout=layout)
            try:
                values = (arguments(autotuner.fn, views(dtype, layout)) if autotuner in SCAN
                          else conv_arguments(autotuner.fn, dtype, layout))
                result.update(compile_one(autotuner, config, values))
            except Exception as e:  # reported, then failed by the test
                result['error'] = f'{type(e).__name__}: {e}'[-3000:]
            print(json.dumps(result), flush=True)
'''


@pytest.fixture(scope='module')
def compiled(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env['TRITON_CACHE_DIR'] = str(tmp_path_factory.mktemp('triton-cache'))
    proc = subprocess.run([sys.executable, '-c', _SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
    assert proc.returncode == 0 and results, f'compile script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'
    for r in results:  # the table shows with pytest -rA or -s
        print(r)
    return results


def test_every_config_compiles_for_sm90(compiled):
    from vim.kernels.triton import bwd, conv, fwd
    errors = [f"{r['kernel']} {r['config']} {r['dtype']}: {r['error']}" for r in compiled if 'error' in r]
    assert not errors, '\n'.join(errors)
    # every autotune config of every kernel, for both dtype/layout pairs (the subprocess sees the GPU config list)
    kernels = (fwd._bidirectional_scan_fwd_kernel, bwd._bidirectional_scan_bwd_kernel,
               conv._bidirectional_conv_fwd_kernel, conv._bidirectional_conv_bwd_kernel)
    assert {r['kernel'] for r in compiled} == {k.fn.__name__ for k in kernels}
    assert all(r['cubin_bytes'] > 0 for r in compiled)


def test_no_register_spills(compiled):
    spilling = [f"{r['kernel']} {r['config']} {r['dtype']}/{r['layout']}: {r['registers']} registers, "
                f"{r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads"
                for r in compiled if 'error' not in r and (r['spill_stores'] or r['spill_loads'])]
    assert not spilling, '\n'.join(spilling)


def test_shared_memory_fits_an_sm90_block(compiled):
    assert all(r['shared'] <= 227 * 1024 for r in compiled if 'error' not in r)
