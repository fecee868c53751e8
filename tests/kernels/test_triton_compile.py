"""Every kernel (scan, conv, and the B/C packing), for every autotune config, compiled ahead of time for the H100
(sm_90) without a GPU, for bf16 inputs in the model's views and fp32 contiguous ones (the session fixture
``sm90_report`` in conftest.py). Catches what the interpreter cannot: lowering failures and register spills
(ptxas's own report)."""
from __future__ import annotations

import pytest

pytest.importorskip('triton')


def test_every_config_compiles_for_sm90(sm90_report):
    from vim.kernels.triton import AUTOTUNED_KERNELS
    rows = sm90_report['kernels']
    errors = [f"{r['kernel']} {r['config']} {r['dtype']}: {r['error']}" for r in rows if 'error' in r]
    assert not errors, '\n'.join(errors)
    # every autotune config of every autotuned kernel, for both dtype/layout pairs (the report lists the GPU configs),
    # once per compiled variant (the backward's main kernel: one per direction)
    for kernel in AUTOTUNED_KERNELS:
        for dtype in ('bf16', 'fp32'):
            mine = [r for r in rows if r['function'] == kernel.fn.__name__ and r['dtype'] == dtype]
            assert mine, (kernel.fn.__name__, dtype)
            for variant in {r['kernel'] for r in mine}:
                configs = [r['config'] for r in mine if r['kernel'] == variant]
                assert len(configs) == len(_gpu_configs(kernel)), (variant, dtype, configs)
    assert {(r['dtype'], r['layout']) for r in rows} == {('bf16', 'mixer'), ('fp32', 'contiguous')}


def _gpu_configs(kernel) -> list:
    """The configs a GPU process autotunes over (under the interpreter the autotuner holds only the first)."""
    from vim.kernels.triton import CONFIGS
    return CONFIGS[kernel.fn.__name__]


def test_no_register_spills(sm90_report):
    spilling = [f"{r['kernel']} {r['config']} {r['dtype']}/{r['layout']}: {r['registers']} registers, "
                f"{r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads"
                for r in sm90_report['kernels'] if 'error' not in r and (r['spill_stores'] or r['spill_loads'])]
    assert not spilling, '\n'.join(spilling)


def test_shared_memory_fits_an_sm90_block(sm90_report):
    assert all(r['shared'] <= 227 * 1024 for r in sm90_report['kernels'] if 'error' not in r)


def test_every_loop_carries_the_variables_it_rotates(sm90_report):
    """Triton carries a loop variable only if one dry run of the body changes its value object (kernels/triton/
    carries.py): a window rotated from one shared zero is read as that zero in the compiled loop, and rotated in
    the interpreter. That was the conv backward's bug on the H100 (2026-11-27), invisible to every interpreter test."""
    rows = [r for r in sm90_report['kernels'] if 'error' not in r]
    assert rows and all('lost_carries' in r for r in rows)
    lost = [f"{r['kernel']} {r['config']} {r['dtype']}: {', '.join(r['lost_carries'])}" for r in rows
            if r['lost_carries']]
    assert not lost, '\n'.join(lost)
