"""tools/extract_features.py on the tiny ``test_vim`` model (patch 8, width 32, 4 blocks) and generated images."""
from __future__ import annotations

import importlib.util
import json
import os
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

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / 'tools' / 'extract_features.py'
_spec = importlib.util.spec_from_file_location('extract_features', TOOL)
ef = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ef)

STRIDE, WIDTH, DEPTH = 8, 32, 4  # test_vim
# (height, width, mode): mixed sizes, aspect ratios and colour modes
SHAPES = {'land.jpg': (40, 56, 'RGB'), 'gray.png': (61, 90, 'L'), 'tall.png': (75, 33, 'RGBA')}


def _make_images(folder: Path, shapes=SHAPES, seed: int = 0) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = {}
    for name, (h, w, mode) in shapes.items():
        chans = {'RGB': 3, 'L': 1, 'RGBA': 4}[mode]
        # smooth gradients plus noise, so that resizing and PCA have structure to work with
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(yy * 255 // h + 40 * c) % 256 + 0 * xx for c in range(chans)], -1)
        arr = np.clip(base + rng.integers(0, 60, (h, w, chans)), 0, 255).astype(np.uint8)
        Image.fromarray(arr.squeeze(-1) if chans == 1 else arr, mode).save(folder / name)
        paths[name] = (folder / name).resolve()
    return paths


@pytest.fixture
def images(tmp_path):
    paths = _make_images(tmp_path / 'imgs')
    corrupt = tmp_path / 'imgs' / 'sub' / 'corrupt.jpg'  # in a subfolder: the folder search must recurse
    corrupt.parent.mkdir()
    corrupt.write_bytes((tmp_path / 'imgs' / 'land.jpg').read_bytes()[:200])  # a truncated JPEG
    paths['corrupt.jpg'] = corrupt.resolve()
    return paths


def _args(folder, out, *extra):
    return [str(folder), '--model', 'test_vim', '--output', str(out), '--device', 'cpu', *extra]


def _index(out: Path) -> dict:
    return json.loads((out / 'index.json').read_text())


def _assert_no_partial_files(out: Path):
    leftovers = [p for p in out.rglob('*') if ef.PARTIAL in p.name]
    assert not leftovers, f'partial files left behind: {leftovers}'


def _assert_index_consistent(out: Path):
    """Every indexed image loads, with the shapes the index states."""
    index = _index(out)
    for path, entry in index['images'].items():
        feats = ef.load_features(out, path)
        assert {k: list(v.shape) for k, v in feats.items()} == entry['shapes']
        assert all(np.isfinite(v).all() for v in feats.values())


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
    rc = ef.main(_args(images['land.jpg'].parent, out, '--img-size', *map(str, size), '--layers', '1', '-1',
                       '--batch-size', '2', '--checkpoint', str(ckpt)))
    assert rc == 1  # some image failed
    index = _index(out)
    assert index['meta']['weights'].startswith('file:')
    assert set(index['images']) == {str(p) for n, p in images.items() if n != 'corrupt.jpg'}
    assert list(index['failed']) == [str(images['corrupt.jpg'])]
    assert str(images['corrupt.jpg']) in capsys.readouterr().out
    _assert_index_consistent(out)
    for name in SHAPES:
        feats = ef.load_features(out, images[name])
        assert set(feats) == {'embedding', 'layer_1', f'layer_{DEPTH - 1}'}
        emb, maps = _reference_features(model, images[name], size, [1, DEPTH - 1])
        np.testing.assert_allclose(feats['embedding'], emb, rtol=1e-4, atol=1e-5)
        for got, want in zip((feats['layer_1'], feats[f'layer_{DEPTH - 1}']), maps, strict=True):
            assert got.shape == (WIDTH, size[0] // STRIDE, size[1] // STRIDE)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_second_run_skips_finished_images(images, tmp_path):
    out = tmp_path / 'out'
    args = _args(images['land.jpg'].parent, out, '--img-size', '32', '--no-pretrained', '--batch-size', '1')
    first = ef.run(ef.parse_args(args))
    assert (first['done'], first['skipped'], len(first['failed'])) == (3, 0, 1)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob('shard-*')}
    assert len(stamps) == 3
    second = ef.run(ef.parse_args(args))
    assert (second['done'], second['skipped'], len(second['failed'])) == (0, 3, 1)  # the corrupt one is retried
    assert {p: p.stat().st_mtime_ns for p in out.glob('shard-*')} == stamps
    with pytest.raises(SystemExit):  # other settings into the same folder would mix features
        ef.main(args + ['--layers', '2'])


def test_interrupted_write_leaves_no_partial_file_and_resume_completes(images, tmp_path, monkeypatch):
    out = tmp_path / 'out'
    (out).mkdir()
    stale = out / f'.shard-00007.safetensors{ef.PARTIAL}999'  # left by a run killed with SIGKILL
    stale.write_bytes(b'half a shard')
    extra = ['--img-size', '32', '--no-pretrained', '--batch-size', '1', '--layers', '2']
    args = _args(images['land.jpg'].parent, out, *extra)
    real_fsync, calls = os.fsync, []

    def fsync_then_die(fd):  # the 3rd write (shard of batch 2) dies after its data reached the temporary file
        calls.append(fd)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(ef.os, 'fsync', fsync_then_die)
    assert ef.main(args) == 130
    monkeypatch.setattr(ef.os, 'fsync', real_fsync)
    _assert_no_partial_files(out)
    assert len(_index(out)['images']) == 1 and len(list(out.glob('shard-*'))) == 1
    _assert_index_consistent(out)
    resumed = ef.run(ef.parse_args(args))
    assert (resumed['done'], resumed['skipped']) == (2, 1)
    assert len(_index(out)['images']) == 3
    _assert_index_consistent(out)
    _assert_no_partial_files(out)
    # the interrupted-and-resumed output equals an uninterrupted run's
    assert ef.main(_args(images['land.jpg'].parent, tmp_path / 'whole', *extra)) == 1
    for name in SHAPES:
        got, want = ef.load_features(out, images[name]), ef.load_features(tmp_path / 'whole', images[name])
        assert got.keys() == want.keys()
        for k in got:
            np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.skipif(not hasattr(os, 'mkfifo'), reason='needs POSIX FIFOs and signals')
def test_sigterm_mid_run_then_resume(tmp_path):
    folder = tmp_path / 'imgs'
    paths = _make_images(folder)
    blocker = folder / 'waiting.png'  # a FIFO: reading it blocks, so the run is surely mid-way when it is killed
    os.mkfifo(blocker)
    listing = tmp_path / 'list.txt'
    listing.write_text('\n'.join(f'imgs/{n}' for n in [*SHAPES, 'waiting.png']))
    out = tmp_path / 'out'
    args = _args(listing, out, '--img-size', '32', '--no-pretrained', '--batch-size', '1', '--layers', '3')
    proc = subprocess.Popen([sys.executable, str(TOOL), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        if (out / 'index.json').exists() and len(_index(out)['images']) == len(SHAPES):
            break
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 130, log
    assert 'rerun the same command to resume' in log
    _assert_no_partial_files(out)
    _assert_index_consistent(out)
    assert set(_index(out)['images']) == {str(p) for p in paths.values()}
    blocker.unlink()
    _make_images(folder, {'waiting.png': (20, 30, 'RGB')})
    resumed = ef.run(ef.parse_args(args))
    assert (resumed['done'], resumed['skipped']) == (1, len(SHAPES))
    _assert_index_consistent(out)


def test_native_sizes_npy_and_random_init_fallback(tmp_path, capsys):
    paths = _make_images(tmp_path / 'imgs')
    out, max_size = tmp_path / 'out', 80
    assert ef.main(_args(tmp_path / 'imgs', out, '--native', '--max-size', str(max_size), '--layers', '-1',
                         '--format', 'npy')) == 0
    index = _index(out)
    assert index['meta']['weights'].startswith('random-init')
    assert 'no pretrained weights' in index['meta']['weights_note']
    assert 'RANDOM' in capsys.readouterr().err
    assert list(out.glob('shard-*.npy'))
    for name, (h, w, _) in SHAPES.items():
        entry = index['images'][str(paths[name])]
        scale = min(1.0, max_size / max(h, w))
        got_h, got_w = entry['input_size']
        for got, want in ((got_h, h * scale), (got_w, w * scale)):
            assert got % STRIDE == 0 and got <= max_size and abs(got - want) <= STRIDE
        assert (got_h > got_w) == (h > w)  # orientation kept: non-square inputs stay non-square
        fmap = ef.load_features(out, paths[name])[f'layer_{DEPTH - 1}']
        assert fmap.shape == (WIDTH, got_h // STRIDE, got_w // STRIDE)
    assert len({tuple(e['input_size']) for e in index['images'].values()}) == len(SHAPES)


def test_vis_writes_a_png_beside_the_input(tmp_path):
    paths = _make_images(tmp_path / 'imgs', {'a.png': (40, 56, 'RGB')})
    out = tmp_path / 'out'
    assert ef.main(_args(paths['a.png'], out, '--img-size', '48', '64', '--no-pretrained', '--vis')) == 0
    entry = _index(out)['images'][str(paths['a.png'])]
    png = out / entry['vis']
    with Image.open(png) as im:
        assert im.format == 'PNG' and im.mode == 'RGB' and im.size == (2 * 64 + 8, 48)
        pca = np.asarray(im)[:, 64 + 8:]
    assert pca.std() > 10  # the PCA picture is not blank
    assert set(ef.load_features(out, paths['a.png'])) == {'embedding'}  # vis alone saves no maps


def test_pca_rgb_follows_the_main_directions():
    c, h, w = 8, 6, 5
    fmap = torch.zeros(c, h, w)
    fmap[0] = torch.linspace(-1, 1, h)[:, None].expand(h, w) * 10  # the dominant direction: top to bottom
    rgb = ef.pca_rgb(fmap + 0.01 * torch.randn(c, h, w))
    assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8
    first = rgb[..., 0].astype(float).mean(1)
    assert abs(np.corrcoef(first, np.arange(h))[0, 1]) > 0.95


@pytest.mark.parametrize('argv, message', [
    (['--model', 'vim_tiny_patch16_22'], 'vim_tiny_patch16_224'),
    (['/no/such/folder'], 'does not exist'),
])
def test_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        ef.main(argv + ['--no-pretrained'])
    assert message in capsys.readouterr().err


def test_empty_input_set(tmp_path, capsys):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'notes.txt.bak').write_text('not an image')
    with pytest.raises(SystemExit):
        ef.main(_args(tmp_path / 'empty', tmp_path / 'out', '--no-pretrained'))
    assert 'no images found' in capsys.readouterr().err


def test_offline_pretrained_falls_back_at_once(monkeypatch, capsys):
    import huggingface_hub
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub, 'try_to_load_from_cache', lambda *a, **k: None)
    t0 = time.perf_counter()
    source, note = ef.pretrained_source('vim_tiny_patch16_224')
    assert source is None and 'HF_HUB_OFFLINE' in note
    assert time.perf_counter() - t0 < 1
    model, weights, note = ef.create_model(ef.parse_args(['--model', 'vim_tiny_patch16_224']))
    assert weights.startswith('random-init') and 'HF_HUB_OFFLINE' in note
    assert 'RANDOM' in capsys.readouterr().err
    assert time.perf_counter() - t0 < 15  # no network retries
