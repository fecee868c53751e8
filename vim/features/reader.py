"""Reading what the extractor wrote: one image's features, or every shard in turn as numpy or torch arrays.

The files are plain ``.npy`` + parquet (see ``layout``), so this module is a convenience, not a requirement::

    emb = np.load('out/img_emb/img_emb_000000.npy')                  # (rows, C)
    meta = pyarrow.parquet.read_table('out/metadata/metadata_000000.parquet')    # key, row, grid_h, ...
    datasets.load_dataset('parquet', data_files='out/metadata/*.parquet')        # the index of all shards
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset
import pyarrow.parquet as pq

from .layout import EMBEDDING, FeatureError, array_path, image_key, parquet_path, shard_number

__all__ = ['FeatureStore', 'Shard', 'iter_features', 'load_features']


@dataclass
class Shard:
    """The features of one shard. ``metadata``: the parquet table (one row per image, in row order).
    ``features``: 'embedding' (rows, C), and per saved layer 'layer_i' as (rows, C, h, w) when every image of the
    shard has the same grid, else a list of (C, h, w) maps; numpy arrays or torch tensors."""
    number: int
    metadata: pa.Table
    features: dict[str, Any]

    @property
    def keys(self) -> list[str]:
        return self.metadata.column('key').to_pylist()


class FeatureStore:
    """An output folder of the extractor, sealed shards only (a run seals its last shard when it ends or is
    interrupted; after kill -9 the next run seals it)."""

    def __init__(self, output: str | Path) -> None:
        self.root = Path(output)
        if not (self.root / 'meta.json').is_file():
            raise FeatureError(f'{self.root} holds no extracted features (no meta.json)')
        self.meta: dict = json.loads((self.root / 'meta.json').read_text())
        self.shards: list[int] = sorted(shard_number(p) for p in self.root.glob('metadata/metadata_*.parquet'))

    @cached_property
    def metadata(self) -> pa.Table:
        """All shards' metadata in one table (columns: see ``writer.SCHEMA``)."""
        files = [str(parquet_path(self.root, s)) for s in self.shards]
        if not files:
            from .writer import SCHEMA
            return SCHEMA.empty_table()
        return pa.dataset.dataset(files, format='parquet').to_table()

    @cached_property
    def _where(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.metadata.column('key').to_pylist())}

    def __len__(self) -> int:
        return self.metadata.num_rows

    def __contains__(self, image: str | Path) -> bool:
        return self._key(image) is not None

    def _key(self, image: str | Path) -> str | None:
        for key in (str(image), image_key(image), str(Path(image).expanduser().resolve())):
            if key in self._where:
                return key
        return None

    @property
    def layers(self) -> list[str]:
        return [f'layer_{i}' for i in self.meta['layers']]

    def load(self, image: str | Path) -> dict[str, np.ndarray]:
        """One image's features: {'embedding': (C,), 'layer_i': (C, h, w), ...}. ``image``: its path (or
        ``<tar>/<member>``), as given to the extractor or resolved."""
        key = self._key(image)
        if key is None:
            raise KeyError(f'{image} is not in {self.root}')
        row = {k: v[0] for k, v in self.metadata.slice(self._where[key], 1).to_pydict().items()}
        out = {EMBEDDING: np.load(array_path(self.root, EMBEDDING, row['shard']), mmap_mode='r')[row['row']].copy()}
        h, w, start = row['grid_h'], row['grid_w'], row['token_offset']
        for name in self.layers:
            tokens = np.load(array_path(self.root, name, row['shard']), mmap_mode='r')[start:start + h * w]
            out[name] = np.ascontiguousarray(tokens.reshape(h, w, -1).transpose(2, 0, 1))
        return out

    def iter_shards(self, framework: str = 'numpy', layers: bool = True) -> Iterator[Shard]:
        """Each sealed shard in turn, loaded whole (at most the shard size in memory). ``framework``: 'numpy' or
        'torch'; ``layers=False`` reads the embeddings only."""
        if framework not in ('numpy', 'torch'):
            raise ValueError(f"framework must be 'numpy' or 'torch', not {framework!r}")
        for shard in self.shards:
            meta = pq.read_table(parquet_path(self.root, shard))
            feats: dict[str, Any] = {EMBEDDING: np.load(array_path(self.root, EMBEDDING, shard))}
            grids = list(zip(meta.column('grid_h').to_pylist(), meta.column('grid_w').to_pylist()))
            offsets = meta.column('token_offset').to_pylist()
            for name in self.layers if layers else []:
                tokens = np.load(array_path(self.root, name, shard))
                maps = [tokens[o:o + h * w].reshape(h, w, -1).transpose(2, 0, 1) for o, (h, w) in zip(offsets, grids)]
                feats[name] = np.stack(maps) if len(set(grids)) == 1 else [np.ascontiguousarray(m) for m in maps]
            if framework == 'torch':
                import torch
                feats = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else [torch.from_numpy(m) for m in v]
                         for k, v in feats.items()}
            yield Shard(shard, meta, feats)

    @property
    def failed(self) -> dict[str, str]:
        """{key: reason} of the images that failed and have not succeeded since."""
        failed: dict[str, str] = {}
        for path in sorted(self.root.glob('failures/*.jsonl')):
            for line in path.read_bytes().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:  # a line torn by a killed run
                    continue
                failed[entry['key']] = entry['reason']
        return {k: r for k, r in failed.items() if k not in self._where}


def load_features(output: str | Path, image: str | Path) -> dict[str, np.ndarray]:
    """One image's features from an output folder: {'embedding': (C,), 'layer_i': (C, h, w), ...}.
    For many look-ups, keep a ``FeatureStore(output)`` (it reads the index once)."""
    return FeatureStore(output).load(image)


def iter_features(output: str | Path, framework: str = 'numpy', layers: bool = True) -> Iterator[Shard]:
    """Every sealed shard of an output folder in turn (see ``FeatureStore.iter_shards``)."""
    return FeatureStore(output).iter_shards(framework, layers)
