"""The static report of the Triton kernels (vim.kernels.triton.report), compiled once per test session for sm_90 and
shared by the compile and report tests. Runs in a subprocess without TRITON_INTERPRET (tests/conftest.py sets it
when CUDA is absent, and it would turn @triton.jit into the interpreter) and with a private Triton cache (a cache
hit would skip ptxas and its register and spill report)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope='session')
def sm90_report(tmp_path_factory) -> dict:
    pytest.importorskip('triton')
    from triton import knobs
    if not os.path.exists(knobs.nvidia.ptxas.path):
        pytest.skip("triton's bundled ptxas (sm_90 toolchain) is not available")
    tmp = tmp_path_factory.mktemp('kernel-report')
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env['TRITON_CACHE_DIR'] = str(tmp / 'triton-cache')
    out = tmp / 'report.json'
    proc = subprocess.run([sys.executable, '-m', 'vim.kernels.triton.report', '--all-layouts', '--json', str(out)],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert out.exists(), f'report failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'
    print(proc.stdout)  # the table shows with pytest -rA or -s
    return json.loads(out.read_text())
