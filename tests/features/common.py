"""Shared by the feature-extraction tests: generated images and checks of an output folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from vim.utils import PARTIAL

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / 'tools' / 'extract_features.py'
STRIDE, WIDTH, DEPTH = 8, 32, 4  # test_vim
# (height, width, mode): mixed sizes, aspect ratios and colour modes
SHAPES = {'land.jpg': (40, 56, 'RGB'), 'gray.png': (61, 90, 'L'), 'tall.png': (75, 33, 'RGBA')}


def make_images(folder: Path, shapes=SHAPES, seed: int = 0) -> dict[str, Path]:
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


def make_many(folder: Path, n: int, size: int = 16, seed: int = 0) -> list[Path]:
    """``n`` small random RGB PNGs named 00000.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f'{i:05d}.png'
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path.resolve())
    return paths


def keys_on_disk(out: Path) -> list[str]:
    """Every key of every sealed shard, read with pyarrow alone (repeats kept)."""
    return [k for p in sorted(out.glob('metadata/metadata_*.parquet')) for k in pq.read_table(p)['key'].to_pylist()]


def assert_no_partial_files(out: Path) -> None:
    leftovers = [p for p in out.rglob('*') if PARTIAL in p.name or p.name.endswith(('.open', '.jsonl'))
                 and p.parent.name != 'failures']
    assert not leftovers, f'temporary or open files left behind: {leftovers}'


def assert_shards_consistent(out: Path) -> None:
    """Each sealed shard's arrays (read with numpy alone) have the rows its parquet (read with pyarrow) states;
    no array without its parquet."""
    numbers = {p.stem.split('_')[-1] for p in out.glob('metadata/metadata_*.parquet')}
    orphans = [p for p in out.glob('*/*.npy') if p.stem.split('_')[-1] not in numbers]
    assert not orphans, f'arrays without metadata: {orphans}'
    for meta_file in sorted(out.glob('metadata/metadata_*.parquet')):
        meta = pq.read_table(meta_file).to_pydict()
        number = meta_file.stem.split('_')[-1]
        emb = np.load(out / 'img_emb' / f'img_emb_{number}.npy')
        assert emb.shape[0] == len(meta['key']) and np.isfinite(emb).all()
        assert meta['row'] == list(range(len(meta['key'])))
        tokens = sum(h * w for h, w in zip(meta['grid_h'], meta['grid_w']))
        for layer in out.glob(f'layer_*/layer_*_{number}.npy'):
            arr = np.load(layer)
            assert arr.shape[0] == tokens and np.isfinite(arr).all()
