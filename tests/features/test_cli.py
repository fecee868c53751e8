"""The command line (vim.features.cli, tools/extract_features.py) on the tiny ``test_vim`` model (patch 8, width 32,
4 blocks) and generated images."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from vim.features import FeatureStore, cli, load_features
from vim.features.model import create_model, pretrained_source
from vim.features.vis import pca_rgb

from .common import (
    DEPTH,
    SHAPES,
    STRIDE,
    TOOL,
    WIDTH,
    assert_no_partial_files,
    assert_shards_consistent,
    keys_on_disk,
    make_images,
)


@pytest.fixture
def images(tmp_path):
    paths = make_images(tmp_path / 'imgs')
    corrupt = tmp_path / 'imgs' / 'sub' / 'corrupt.jpg'  # in a subfolder: the folder search must recurse
    corrupt.parent.mkdir()
    corrupt.write_bytes((tmp_path / 'imgs' / 'land.jpg').read_bytes()[:200])  # a truncated JPEG
    paths['corrupt.jpg'] = corrupt.resolve()
    return paths


def _args(folder, out, *extra):
    return [str(folder), '--model', 'test_vim', '--output', str(out), '--device', 'cpu', '--quiet', *extra]


def _run(argv):
    return cli.run(cli.parse_args(argv)[0])


def _assert_store_consistent(out: Path):
    """Every indexed image loads, with the shapes its metadata states."""
    store = FeatureStore(out)
    meta = store.metadata.to_pydict()
    for key, gh, gw in zip(meta['key'], meta['grid_h'], meta['grid_w']):
        feats = store.load(key)
        assert feats['embedding'].shape == (WIDTH,)
        for name in store.layers:
            assert feats[name].shape == (WIDTH, gh, gw)
    assert_shards_consistent(out)


def _reference_features(model, path: Path, size, layers):
    """What the tool should compute, written independently: PIL resize, normalise, the model's two entry points."""
    cfg = model.pretrained_cfg
    im = Image.open(path).convert('RGB').resize((size[1], size[0]), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)
    x = ((x - torch.tensor(cfg['mean'])[:, None, None]) / torch.tensor(cfg['std'])[:, None, None])[None]
    with torch.no_grad():
        emb = model.forward_head(model.forward_features(x), pre_logits=True)[0]
        maps = model.forward_intermediates(x, indices=layers, intermediates_only=True, output_fmt='NCHW')
    return emb.numpy(), [m[0].numpy() for m in maps]


def test_outputs_match_the_model_and_corrupt_image_is_skipped(images, tmp_path, capsys):
    model = timm.create_model('test_vim', dynamic_img_size=True).eval()
    ckpt = tmp_path / 'test_vim.safetensors'
    save_file(model.state_dict(), str(ckpt))
    out = tmp_path / 'out'
    size = (48, 64)
    rc = cli.main(_args(images['land.jpg'].parent, out, '--img-size', *map(str, size), '--layers', '1', '-1',
                        '--batch-size', '2', '--checkpoint', str(ckpt)))
    assert rc == 1  # some image failed
    store = FeatureStore(out)
    assert store.meta['weights'].startswith('file:')
    assert sorted(keys_on_disk(out)) == sorted(str(p) for n, p in images.items() if n != 'corrupt.jpg')
    assert list(store.failed) == [str(images['corrupt.jpg'])]
    log = capsys.readouterr().out
    assert str(images['corrupt.jpg']) in log
    assert re.search(r'img/s average, [\d.]+ img/s over the last 20 batches', log) and 'peak memory' in log
    _assert_store_consistent(out)
    for name in SHAPES:
        feats = load_features(out, images[name])
        assert set(feats) == {'embedding', 'layer_1', f'layer_{DEPTH - 1}'}
        emb, maps = _reference_features(model, images[name], size, [1, DEPTH - 1])
        np.testing.assert_allclose(feats['embedding'], emb, rtol=1e-4, atol=1e-5)
        for got, want in zip((feats['layer_1'], feats[f'layer_{DEPTH - 1}']), maps, strict=True):
            assert got.shape == (WIDTH, size[0] // STRIDE, size[1] // STRIDE)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_second_run_skips_finished_images(images, tmp_path):
    out = tmp_path / 'out'
    args = _args(images['land.jpg'].parent, out, '--img-size', '32', '--no-pretrained', '--batch-size', '1')
    first = _run(args)
    assert (first['done'], first['skipped'], len(first['failed'])) == (3, 0, 1)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob('[im]*/*.*')}
    assert len(list(out.glob('img_emb/*.npy'))) == 1  # one shard of 3 images, filled across 3 batches
    second = _run(args)
    assert (second['done'], second['skipped'], len(second['failed'])) == (0, 3, 1)  # the corrupt one is retried
    assert {p: p.stat().st_mtime_ns for p in out.glob('[im]*/*.*')} == stamps
    with pytest.raises(SystemExit):  # other settings into the same folder would mix features
        cli.main(args + ['--layers', '2'])


def test_interrupted_write_leaves_no_partial_file_and_resume_completes(images, tmp_path, monkeypatch):
    out = tmp_path / 'out'
    extra = ['--img-size', '32', '--no-pretrained', '--batch-size', '1', '--layers', '2', '--shard-images', '2']
    args = _args(images['land.jpg'].parent, out, *extra)
    real_fsync, calls = os.fsync, []

    def fsync_then_stop(fd):  # Ctrl-C inside a commit: after the first shard is sealed, in the next batch's writes
        calls.append(fd)
        if len(calls) == 12:
            raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(os, 'fsync', fsync_then_stop)
    assert cli.main(args) == 130
    monkeypatch.setattr(os, 'fsync', real_fsync)
    assert_no_partial_files(out)
    assert len(keys_on_disk(out)) == 2
    _assert_store_consistent(out)
    resumed = _run(args)
    assert (resumed['done'], resumed['skipped']) == (1, 2)
    assert sorted(keys_on_disk(out)) == sorted(str(images[n]) for n in SHAPES)
    _assert_store_consistent(out)
    assert_no_partial_files(out)
    # the interrupted-and-resumed output equals an uninterrupted run's
    assert cli.main(_args(images['land.jpg'].parent, tmp_path / 'whole', *extra)) == 1
    for name in SHAPES:
        got, want = load_features(out, images[name]), load_features(tmp_path / 'whole', images[name])
        assert got.keys() == want.keys()
        for k in got:
            np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.skipif(not hasattr(os, 'mkfifo'), reason='needs POSIX FIFOs and signals')
def test_sigterm_mid_run_seals_what_is_done_then_resume(tmp_path):
    folder = tmp_path / 'imgs'
    paths = make_images(folder)
    blocker = folder / 'waiting.png'  # a FIFO: reading it blocks, so the run is surely mid-way when it is killed
    os.mkfifo(blocker)
    listing = tmp_path / 'list.txt'
    listing.write_text('\n'.join(f'imgs/{n}' for n in [*SHAPES, 'waiting.png']))
    out = tmp_path / 'out'
    args = _args(listing, out, '--img-size', '32', '--no-pretrained', '--batch-size', '1', '--layers', '3')
    proc = subprocess.Popen([sys.executable, str(TOOL), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    record = None
    while proc.poll() is None and time.time() < deadline:  # the 3 images before the FIFO are committed
        record = next(out.glob('metadata/.metadata_*.jsonl'), None)
        if record is not None and record.read_bytes().count(b'\n') == len(SHAPES):
            break
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 130, log
    assert 'rerun the same command to resume' in log
    assert_no_partial_files(out)
    _assert_store_consistent(out)
    assert sorted(keys_on_disk(out)) == sorted(str(p) for p in paths.values())
    blocker.unlink()
    make_images(folder, {'waiting.png': (20, 30, 'RGB')})
    resumed = _run(args)
    assert (resumed['done'], resumed['skipped']) == (1, len(SHAPES))
    _assert_store_consistent(out)


def test_native_sizes_and_random_init_fallback(tmp_path, capsys):
    paths = make_images(tmp_path / 'imgs')
    out, max_size = tmp_path / 'out', 80
    assert cli.main(_args(tmp_path / 'imgs', out, '--native', '--max-size', str(max_size), '--layers', '-1',
                          '--batch-size', '4')) == 0
    store = FeatureStore(out)
    assert store.meta['weights'].startswith('random-init')
    assert 'no pretrained weights' in store.meta['weights_note']
    assert 'RANDOM' in capsys.readouterr().err
    meta = store.metadata.to_pydict()
    for name, (h, w, _) in SHAPES.items():
        i = meta['key'].index(str(paths[name]))
        scale = min(1.0, max_size / max(h, w))
        got_h, got_w = meta['input_h'][i], meta['input_w'][i]
        for got, want in ((got_h, h * scale), (got_w, w * scale)):
            assert got % STRIDE == 0 and got <= max_size and abs(got - want) <= STRIDE
        assert (got_h > got_w) == (h > w)  # orientation kept: non-square inputs stay non-square
        fmap = load_features(out, paths[name])[f'layer_{DEPTH - 1}']
        assert fmap.shape == (WIDTH, got_h // STRIDE, got_w // STRIDE)
    assert len(set(zip(meta['input_h'], meta['input_w']))) == len(SHAPES)
    (shard,) = store.iter_shards()  # one shard; different grids come back as a list of maps
    assert isinstance(shard.features[f'layer_{DEPTH - 1}'], list)
    _assert_store_consistent(out)


def test_vis_writes_a_png_beside_the_input(tmp_path):
    paths = make_images(tmp_path / 'imgs', {'a.png': (40, 56, 'RGB')})
    out = tmp_path / 'out'
    assert cli.main(_args(paths['a.png'], out, '--img-size', '48', '64', '--no-pretrained', '--vis')) == 0
    png = out / FeatureStore(out).metadata['vis'][0].as_py()
    with Image.open(png) as im:
        assert im.format == 'PNG' and im.mode == 'RGB' and im.size == (2 * 64 + 8, 48)
        pca = np.asarray(im)[:, 64 + 8:]
    assert pca.std() > 10  # the PCA picture is not blank
    assert set(load_features(out, paths['a.png'])) == {'embedding'}  # vis alone saves no maps


def test_pca_rgb_follows_the_main_directions():
    c, h, w = 8, 6, 5
    fmap = torch.zeros(c, h, w)
    fmap[0] = torch.linspace(-1, 1, h)[:, None].expand(h, w) * 10  # the dominant direction: top to bottom
    rgb = pca_rgb(fmap + 0.01 * torch.randn(c, h, w))
    assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8
    first = rgb[..., 0].astype(float).mean(1)
    assert abs(np.corrcoef(first, np.arange(h))[0, 1]) > 0.95


@pytest.mark.parametrize('argv, message', [
    (['--model', 'vim_tiny_patch16_22'], 'vim_tiny_patch16_224'),
    (['/no/such/folder'], 'does not exist'),
    (['--shard-bytes', 'lots'], 'not a size'),
])
def test_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(argv + ['--no-pretrained'])
    assert message in capsys.readouterr().err


def test_empty_input_set(tmp_path, capsys):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'notes.txt.bak').write_text('not an image')
    with pytest.raises(SystemExit):
        cli.main(_args(tmp_path / 'empty', tmp_path / 'out', '--no-pretrained'))
    assert 'no images found' in capsys.readouterr().err


def test_offline_pretrained_falls_back_at_once(monkeypatch, capsys):
    import huggingface_hub
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub, 'try_to_load_from_cache', lambda *a, **k: None)
    t0 = time.perf_counter()
    source, note = pretrained_source('vim_tiny_patch16_224')
    assert source is None and 'HF_HUB_OFFLINE' in note
    assert time.perf_counter() - t0 < 1
    model, weights, note = create_model('vim_tiny_patch16_224')
    assert weights.startswith('random-init') and 'HF_HUB_OFFLINE' in note
    assert 'RANDOM' in capsys.readouterr().err
    assert time.perf_counter() - t0 < 15  # no network retries

