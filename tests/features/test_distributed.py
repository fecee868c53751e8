"""torch.distributed on CPU (gloo): torchrun ranks split the images, write their own shards, and the output reads
as one; a rerun with another world size resumes."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from vim.features import Extractor, FeatureStore

from .common import TOOL, assert_no_partial_files, assert_shards_consistent, keys_on_disk, make_many

pytestmark = pytest.mark.slow  # starts torch in 5 processes


def _torchrun(n: int, inputs, out) -> str:
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(n), str(TOOL),
           str(inputs), '--model', 'test_vim', '--no-pretrained', '--img-size', '16', '--batch-size', '4',
           '--shard-images', '5', '--device', 'cpu', '--output', str(out), '--quiet']
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_two_ranks_equal_one_process_and_three_ranks_resume(tmp_path):
    paths = make_many(tmp_path / 'imgs', 23)
    (tmp_path / 'first.txt').write_text('\n'.join(f'imgs/{p.name}' for p in paths[:11]))
    ref = tmp_path / 'ref'
    Extractor('test_vim', pretrained=False, img_size=16, device='cpu', batch_size=4, progress=False).run(
        [tmp_path / 'imgs'], ref)

    log = _torchrun(2, tmp_path / 'first.txt', tmp_path / 'out')
    assert re.search(r'images: 11 done, 0 skipped', log), log
    assert 'over 2 ranks' in log
    assert sorted(keys_on_disk(tmp_path / 'out')) == sorted(map(str, paths[:11]))  # each once
    log = _torchrun(3, tmp_path / 'imgs', tmp_path / 'out')  # another world size: only the other 12
    assert re.search(r'images: 12 done, 11 skipped', log), log
    keys = keys_on_disk(tmp_path / 'out')
    assert sorted(keys) == sorted(map(str, paths))
    assert_no_partial_files(tmp_path / 'out')
    assert_shards_consistent(tmp_path / 'out')
    got, want = FeatureStore(tmp_path / 'out'), FeatureStore(ref)
    for p in paths:  # other batch compositions: equal within fp32 rounding
        np.testing.assert_allclose(got.load(p)['embedding'], want.load(p)['embedding'], rtol=1e-5, atol=1e-6)
