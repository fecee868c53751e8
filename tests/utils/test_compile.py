"""vim.utils.maybe_compile: torch.compile behind --torchcompile, with the scan backend settled before tracing."""
from __future__ import annotations

import pytest
import torch
import vim.kernels

from vim.utils import maybe_compile


def test_no_backend_is_the_module_itself_and_a_mode_alone_is_refused():
    module = torch.nn.Linear(2, 2)
    assert maybe_compile(module, None) is module
    with pytest.raises(ValueError, match='needs --torchcompile'):
        maybe_compile(module, None, 'max-autotune')


@pytest.mark.parametrize('device, dtype, expected', [
    ('cuda:1', torch.bfloat16, [(torch.device('cuda:1'), torch.bfloat16)]),
    ('cuda', None, [(torch.device('cuda'), torch.float32)]),  # no autocast: the scans run in fp32
    ('cpu', torch.bfloat16, [(torch.device('cpu'), torch.bfloat16)]),
    (None, None, []),
])
def test_the_scan_backend_is_settled_before_tracing(device, dtype, expected, monkeypatch):
    """torch.compile traces before any eager call; on CUDA 'auto' must have run its self-check by then, or it takes
    the reference during tracing (tests/kernels/test_dispatch_selfcheck.py runs that for real). No CUDA is needed
    here: torch.compile wraps lazily."""
    calls = []
    monkeypatch.setattr(vim.kernels, 'warmup', lambda device, dtype: calls.append((torch.device(device), dtype)))
    module = torch.nn.Linear(2, 2)
    compiled = maybe_compile(module, 'aot_eager', device=device, dtype=dtype)
    assert compiled is not module and compiled._orig_mod is module
    assert calls == expected


def test_the_flag_names_a_backend_or_says_what_went_wrong(capsys):
    import argparse

    from vim.utils import add_compile_arguments
    p = argparse.ArgumentParser()
    p.add_argument('inputs', nargs='*')
    add_compile_arguments(p)
    assert p.parse_args(['photos/', '--torchcompile']).torchcompile == 'inductor'
    assert p.parse_args(['--torchcompile', 'aot_eager', 'photos/']).torchcompile == 'aot_eager'
    with pytest.raises(SystemExit):
        p.parse_args(['--torchcompile', 'photos/'])
    assert "'photos/' is not a torch.compile backend" in capsys.readouterr().err


def test_uses_scan_tells_vim_from_other_models():
    import timm

    import vim  # noqa: F401  (registers the models)
    from vim.layers import uses_scan
    assert uses_scan(timm.create_model('test_vim'))
    assert not uses_scan(timm.create_model('test_vit'))
