"""kernels/triton/carries.py: the loop-carry check flags a window rotated from one shared value (what broke the conv
backward on the GPU while every interpreter test passed) and nothing in the same rotation from distinct values.
Compiled for sm_90 without a GPU, in a subprocess without TRITON_INTERPRET (tests/conftest.py sets it); the
kernels' own loops are checked by the static report (test_triton_compile.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip('triton')
import triton.language as tl  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _rotate_from_shared_zero(out_ptr, n):
    zero = tl.zeros((32,), dtype=tl.float32)
    a, b = zero, zero
    for _ in range(n):
        a, b = b, b + 1.0
    tl.store(out_ptr + tl.arange(0, 32), a)


def _rotate_from_distinct_values(out_ptr, n):
    a = tl.zeros((32,), dtype=tl.float32)
    b = a + 1.0
    for _ in range(n):
        a, b = b, b + 1.0
    tl.store(out_ptr + tl.arange(0, 32), a)


_COMPILE = '''
import json, triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction
from tests.kernels import test_triton_carries as t
from vim.kernels.triton.carries import watch_loop_carries
triton.knobs.compilation.always_compile = True  # a cache hit would skip the frontend
lost = {}
for fn in (t._rotate_from_shared_zero, t._rotate_from_distinct_values):
    lost[fn.__name__] = []
    src = triton.compiler.ASTSource(fn=JITFunction(fn), signature={'out_ptr': '*fp32', 'n': 'i32'})
    with watch_loop_carries(lost[fn.__name__]):
        triton.compile(src, target=GPUTarget('cuda', 90, 32))
print(json.dumps(lost))
'''


@pytest.fixture(scope='module')
def lost(tmp_path_factory) -> dict:
    from triton import knobs
    if not os.path.exists(knobs.nvidia.ptxas.path):
        pytest.skip("triton's bundled ptxas (sm_90 toolchain) is not available")
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env['TRITON_CACHE_DIR'] = str(tmp_path_factory.mktemp('triton-cache'))
    proc = subprocess.run([sys.executable, '-c', _COMPILE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_rotation_from_one_shared_value_is_flagged(lost):
    flagged = lost['_rotate_from_shared_zero']
    assert [entry.rsplit(': ', 1)[1] for entry in flagged] == ['a'], flagged
    assert flagged[0].startswith('_rotate_from_shared_zero:')


def test_the_same_rotation_from_distinct_values_is_not(lost):
    assert lost['_rotate_from_distinct_values'] == []
