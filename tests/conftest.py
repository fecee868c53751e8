import os

# Before torch loads OpenMP: spinning worker threads make tiny ops 10-20x slower when the machine is busy.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import pytest  # noqa: E402
import torch  # noqa: E402

# The Triton interpreter must be chosen before any @triton.jit runs; without CUDA, kernels run through it.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason='needs a CUDA device')
    for item in items:
        if 'gpu' in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_runtest_logreport(report):
    """With $VIM_FAILURE_LOG set, each failure's traceback is appended to that file as soon as the test ends: a GPU
    run cut off by its time limit (benchmarks/gpu_run.sh) still says why each finished test failed. Written by the
    controlling process only (pytest-xdist workers report to it)."""
    path = os.environ.get('VIM_FAILURE_LOG')
    if path and report.failed and not os.environ.get('PYTEST_XDIST_WORKER'):
        with open(path, 'a') as f:
            f.write(f'{report.nodeid} ({report.when})\n{report.longreprtext}\n\n')
