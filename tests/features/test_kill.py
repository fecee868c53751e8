"""A real process killed with SIGKILL at random moments, then rerun: every image ends up exactly once."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from vim.features import Extractor, FeatureStore

from .common import TOOL, assert_no_partial_files, assert_shards_consistent, keys_on_disk, make_many

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(signal, 'SIGKILL'), reason='needs SIGKILL')]


def test_sigkill_at_random_moments_then_rerun(tmp_path):
    paths = make_many(tmp_path / 'imgs', 150)
    out = tmp_path / 'out'
    cmd = [sys.executable, str(TOOL), str(tmp_path / 'imgs'), '--model', 'test_vim', '--no-pretrained',
           '--img-size', '16', '--batch-size', '3', '--shard-images', '7', '--device', 'cpu', '--output', str(out),
           '--quiet']
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and not (out / 'meta.json').exists():
            time.sleep(0.02)  # the model is built: writing starts within moments
        time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    assert kills, f'every run ended before its kill (seed {seed})'
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout + final.stderr
    keys = keys_on_disk(out)
    assert sorted(keys) == sorted(map(str, paths)), f'seed {seed}'  # every image exactly once
    assert_no_partial_files(out)
    assert_shards_consistent(out)
    ref = tmp_path / 'ref'
    Extractor('test_vim', pretrained=False, img_size=16, device='cpu', batch_size=3, progress=False).run(
        [tmp_path / 'imgs'], ref)
    got, want = FeatureStore(out), FeatureStore(ref)
    for p in paths[::10]:
        np.testing.assert_allclose(got.load(p)['embedding'], want.load(p)['embedding'], rtol=1e-5, atol=1e-6)
