"""Shards filled across batches, O(batch) commits and recovery after a crash at every step of the write protocol."""
from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from vim.features import Extractor, FeatureStore, iter_features
from vim.features.layout import npy_header, read_npy_header
from vim.features.writer import ShardWriter, read_record, recover

from .common import assert_no_partial_files, assert_shards_consistent, keys_on_disk, make_many


class SimulatedKill(BaseException):
    """Stands for SIGKILL: caught by nothing in the extractor, so no clean-up runs (the open shard stays open)."""


def _rows(keys, grid=(2, 3)):
    return [[k, 8 * grid[0], 8 * grid[1], *grid, None] for k in keys]


def test_npy_header_is_fixed_size_and_numpy_reads_it(tmp_path):
    for shape in [(0, 5), (3, 192), (10**12, 4096)]:
        head = npy_header(shape)
        assert len(head) == 128 and read_npy_header(head) == shape
    path = tmp_path / 'a.npy'
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    path.write_bytes(npy_header(data.shape) + data.tobytes())
    np.testing.assert_array_equal(np.load(path), data)


@pytest.mark.parametrize('max_images, max_bytes, sizes', [
    (5, 2**30, [5, 5, 2]),  # by count: 3 + 4 + 5 images in batches of 3, 4, 5 -> shards of 5, 5, 2
    (100, 4 * 120 + 1, [5, 5, 2]),  # by bytes: an image is (6 + 4 * 6) * 4 bytes; the 5th crosses the limit
])
def test_shards_fill_across_batches_and_split_them(tmp_path, max_images, max_bytes, sizes):
    writer = ShardWriter(tmp_path, itertools.count(7, 2), max_images, max_bytes)
    rng = np.random.default_rng(0)
    batches, start = [], 0
    for n in (3, 4, 5):
        keys = [f'/img/{i}' for i in range(start, start + n)]
        arrays = dict(embedding=rng.standard_normal((n, 6)).astype(np.float32),
                      layer_1=rng.standard_normal((n, 4, 2, 3)).astype(np.float32))
        writer.add(_rows(keys), arrays)
        batches.append((keys, arrays))
        start += n
    writer.close()
    assert writer.sealed == [7, 9, 11]
    assert [len(pq.read_table(tmp_path / 'metadata' / f'metadata_{s:06d}.parquet')) for s in (7, 9, 11)] == sizes
    (tmp_path / 'meta.json').write_text(json.dumps(dict(layers=[1])))
    store = FeatureStore(tmp_path)
    for keys, arrays in batches:
        for i, key in enumerate(keys):
            got = store.load(key)
            np.testing.assert_array_equal(got['embedding'], arrays['embedding'][i])
            np.testing.assert_array_equal(got['layer_1'], arrays['layer_1'][i])
    assert_no_partial_files(tmp_path)
    assert_shards_consistent(tmp_path)


def test_torn_record_line_is_not_committed(tmp_path):
    writer = ShardWriter(tmp_path, itertools.count(), 100)
    writer.add(_rows(['/a', '/b']), dict(embedding=np.ones((2, 3), np.float32)))
    writer.add(_rows(['/c']), dict(embedding=np.full((1, 3), 2, np.float32)))
    record = tmp_path / 'metadata' / '.metadata_000000.jsonl'
    text = record.read_bytes()
    record.write_bytes(text[:-7])  # the second commit's line cut short: as if killed while writing it
    assert [r[0] for r in read_record(record)[0]] == ['/a', '/b']
    assert recover(tmp_path) == [0]
    assert keys_on_disk(tmp_path) == ['/a', '/b']
    np.testing.assert_array_equal(np.load(tmp_path / 'img_emb' / 'img_emb_000000.npy'), np.ones((2, 3)))
    assert_no_partial_files(tmp_path)


@pytest.fixture(scope='module')
def extractor():
    return Extractor('test_vim', pretrained=False, img_size=16, layers=[1], device='cpu', batch_size=2,
                     shard_images=3, progress=False)


def test_kill_at_every_write_step_then_rerun_gives_every_image_once(tmp_path, extractor, monkeypatch):
    paths = make_many(tmp_path / 'imgs', 7)
    whole = extractor.run([tmp_path / 'imgs'], tmp_path / 'whole')
    assert whole['done'] == 7 and whole['shards'] == [0, 1, 2]
    want = {k: FeatureStore(tmp_path / 'whole').load(k) for k in map(str, paths)}
    real = {name: getattr(os, name) for name in ('fsync', 'replace')}
    calls = []

    def counting(name, limit):
        def call(*args):
            calls.append(name)
            if len(calls) == limit:
                raise SimulatedKill
            return real[name](*args)
        return call

    for name in real:
        monkeypatch.setattr(os, name, counting(name, None))
    extractor.run([tmp_path / 'imgs'], tmp_path / 'count')
    steps = len(calls)
    assert steps > 30  # 4 batches of 3 fsyncs, 3 seals of 3 fsyncs and 3 renames, meta.json
    for limit in range(1, steps + 1):
        out = tmp_path / f'kill{limit}'
        calls.clear()
        for name in real:
            monkeypatch.setattr(os, name, counting(name, limit))
        with pytest.raises(SimulatedKill):
            extractor.run([tmp_path / 'imgs'], out)
        for name in real:
            monkeypatch.setattr(os, name, real[name])
        committed = len(keys_on_disk(out)) + sum(len(read_record(r)[0]) for r in out.glob('metadata/.*.jsonl'))
        rerun = extractor.run([tmp_path / 'imgs'], out)
        keys = keys_on_disk(out)
        assert sorted(keys) == sorted(map(str, paths)), f'killed at step {limit} ({calls[-1]})'
        assert (rerun['skipped'], rerun['done']) == (committed, 7 - committed)  # open shards completed, not redone
        assert_no_partial_files(out)
        assert_shards_consistent(out)
        store = FeatureStore(out)
        for key in keys:  # same batches as the whole run (batch 2 of one size), so the same numbers
            got = store.load(key)
            assert got.keys() == want[key].keys()
            for name in got:
                np.testing.assert_allclose(got[name], want[key][name], rtol=1e-5, atol=1e-6)


def test_iterate_shards_as_numpy_and_torch(tmp_path, extractor):
    paths = make_many(tmp_path / 'imgs', 5)
    extractor.run([tmp_path / 'imgs'], tmp_path / 'out')
    seen = []
    for np_shard, pt_shard in zip(iter_features(tmp_path / 'out'), iter_features(tmp_path / 'out', 'torch')):
        emb, maps = np_shard.features['embedding'], np_shard.features['layer_1']
        assert emb.shape == (len(np_shard.keys), 32) and maps.shape == (len(np_shard.keys), 32, 2, 2)
        assert isinstance(pt_shard.features['layer_1'], torch.Tensor)
        np.testing.assert_array_equal(pt_shard.features['embedding'].numpy(), emb)
        for i, key in enumerate(np_shard.keys):
            np.testing.assert_array_equal(FeatureStore(tmp_path / 'out').load(key)['layer_1'], maps[i])
        seen += np_shard.keys
    assert sorted(seen) == sorted(map(str, paths))
    (only_emb,) = itertools.islice(iter_features(tmp_path / 'out', layers=False), 1)
    assert set(only_emb.features) == {'embedding'}
