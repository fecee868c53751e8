"""Inputs: WebDataset-style tars streamed member by member, lists and globs; keys and failures."""
from __future__ import annotations

import io
import sys
import tarfile

import numpy as np
import pytest

from vim.features import Extractor, FeatureError, FeatureStore
from vim.features.extractor import _lock
from vim.features.sources import collect_images

from .common import assert_shards_consistent, keys_on_disk, make_many


def _tar(path, members: dict[str, bytes]):
    with tarfile.open(path, 'w') as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope='module')
def extractor():
    return Extractor('test_vim', pretrained=False, img_size=16, device='cpu', batch_size=3, shard_images=4,
                     progress=False)


def test_tar_members_match_the_same_images_as_files_and_corrupt_ones_are_reported(tmp_path, extractor):
    files = make_many(tmp_path / 'imgs', 6)
    members = {}
    for i, f in enumerate(files):  # WebDataset style: <key>.<ext> plus other members of the same sample
        members[f'sample{i:03d}.png'] = f.read_bytes()
        members[f'sample{i:03d}.cls'] = str(i).encode()
    members['sample900.jpg'] = files[0].read_bytes()[:60]  # truncated
    members['sample901.png'] = b'not an image'
    _tar(tmp_path / 'a.tar', dict(list(members.items())[:7]))
    _tar(tmp_path / 'b.tar', dict(list(members.items())[7:]))
    tars = [tmp_path / 'a.tar', tmp_path / 'b.tar']
    summary = extractor.run([str(tmp_path / '*.tar')], tmp_path / 'out')
    assert summary['done'] == 6
    bad = {str(tmp_path / 'b.tar' / 'sample900.jpg'), str(tmp_path / 'b.tar' / 'sample901.png')}
    assert set(summary['failed']) == bad and set(FeatureStore(tmp_path / 'out').failed) == bad
    extractor.run([tmp_path / 'imgs'], tmp_path / 'ref')
    store, ref = FeatureStore(tmp_path / 'out'), FeatureStore(tmp_path / 'ref')
    for i, f in enumerate(files):
        key = str(tars[0 if i < 4 else 1] / f'sample{i:03d}.png')  # a.tar: samples 0-2 and 3's png
        np.testing.assert_allclose(store.load(key)['embedding'], ref.load(f)['embedding'], rtol=1e-5, atol=1e-6)
    assert_shards_consistent(tmp_path / 'out')
    again = extractor.run([tmp_path / 'a.tar', tmp_path / 'b.tar'], tmp_path / 'out')
    assert (again['done'], again['skipped'], len(again['failed'])) == (0, 6, 2)
    assert len(keys_on_disk(tmp_path / 'out')) == 6


def test_a_damaged_tar_keeps_the_members_before_the_damage(tmp_path, extractor):
    files = make_many(tmp_path / 'imgs', 3)
    _tar(tmp_path / 'a.tar', {f'{i}.png': f.read_bytes() for i, f in enumerate(files)})
    with tarfile.open(tmp_path / 'a.tar') as tf:
        second = tf.getmembers()[1]
    data = (tmp_path / 'a.tar').read_bytes()
    (tmp_path / 'cut.tar').write_bytes(data[:second.offset_data + second.size])  # ends after the 2nd member
    (tmp_path / 'torn.tar').write_bytes(data[:second.offset_data + 100])  # ends inside the 2nd member's data
    for name, done in (('cut.tar', 2), ('torn.tar', 1)):
        found, _ = collect_images([tmp_path / name])
        assert list(found) == [str(tmp_path / name / '0.png'), str(tmp_path / name / '1.png')]
        summary = extractor.run([tmp_path / name], tmp_path / f'out-{name}')
        assert summary['done'] == done
        assert 'unreadable tar' in summary['failed'][str(tmp_path / name)]  # the damage is reported
        assert (str(tmp_path / name / '1.png') in summary['failed']) == (done == 1)


def test_lists_globs_and_missing_inputs(tmp_path):
    files = make_many(tmp_path / 'imgs', 3)
    (tmp_path / 'list.txt').write_text('# a comment\nimgs/00000.png\n\nimgs/00002.png\n')
    found, _ = collect_images([tmp_path / 'list.txt', str(tmp_path / 'imgs' / '*1.png'), files[0]])
    assert list(found) == [str(f) for f in files]  # sorted, each once
    with pytest.raises(FeatureError, match='does not exist'):
        collect_images([tmp_path / 'nope'])


@pytest.mark.skipif(sys.platform == 'win32', reason='fcntl locks')
def test_a_second_run_on_the_same_folder_is_refused(tmp_path, extractor):
    make_many(tmp_path / 'imgs', 2)
    (tmp_path / 'out').mkdir()
    held = _lock(tmp_path / 'out')  # as a run in another process would hold it
    with pytest.raises(FeatureError, match='another extraction is writing'):
        extractor.run(str(tmp_path / 'imgs'), tmp_path / 'out')
    held.close()
    assert extractor.run(str(tmp_path / 'imgs'), tmp_path / 'out')['done'] == 2  # one input as a plain string


def test_native_batches_hold_one_size_and_bounded_waiting(tmp_path):
    from PIL import Image

    from vim.features.extractor import _native_size
    from vim.features.sources import ImageStream, plan_units
    sizes = [(16, 16), (24, 16), (16, 16), (32, 8), (16, 16), (24, 16)] * 5
    for i, (h, w) in enumerate(sizes):
        Image.new('RGB', (w, h), (i, 2 * i, 3 * i)).save(tmp_path / f'{i:03d}.png')
    found, _ = collect_images([tmp_path])
    stream = ImageStream(plan_units(list(found), found), lambda h, w: _native_size(h, w, 8, 8, 64),
                         dict(interpolation='bicubic', mean=(0.5,) * 3, std=(0.5,) * 3), batch_size=4)
    for max_pending, most_partial in ((16, 3), (2, len(sizes))):
        stream.max_pending = max_pending
        batches = list(stream)
        assert sorted(k for b in batches for k in b['keys']) == sorted(found)  # every image once
        assert all(b['x'].shape[0] == len(b['keys']) <= 4 for b in batches)  # one size per batch (stacked)
        partial = [b for b in batches if len(b['keys']) < 4]
        assert len(partial) <= most_partial  # room for 3 sizes x 3 waiting: only the last batch of each size
    assert len(partial) > 3  # with room for 2, the bound cut batches short
