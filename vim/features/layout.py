"""The output folder of the feature extractor: file names, the appendable ``.npy`` format and the settings file.

    meta.json                      settings the features were made with (model, weights, size, layers, dtype)
    img_emb/img_emb_000012.npy     pooled embeddings of one shard, float32 (rows, C), clip-retrieval's layout
    layer_5/layer_5_000012.npy     (``layers``) patch features of one shard, float32 (sum of h * w over rows, C):
                                   image i's map is rows ``token_offset[i]`` to ``+ grid_h * grid_w``, token-major
    metadata/metadata_000012.parquet   one row per image: key, shard, row, input_h, input_w, grid_h, grid_w,
                                   token_offset, vis; ``key`` is the image's absolute path (``<tar>/<member>`` for
                                   an image inside a .tar)
    failures/rank_00000.jsonl      {"key", "reason"} per line, appended as images fail (a later success wins)
    vis/*.png                      (``vis``) the input beside a PCA-to-RGB picture of the last requested layer

A shard is complete when its parquet file exists: the parquet is written last, atomically. While a shard is being
filled, its arrays are ``.<name>.npy.open`` files and its record ``metadata/.metadata_N.jsonl`` (see ``writer``).
These are plain ``.npy`` and parquet files: numpy, pyarrow, Hugging Face ``datasets``, embedding-reader and autofaiss
read them without this package (embedding-reader's ``parquet_npy`` format pairs ``img_emb/*.npy`` with
``metadata/*.parquet`` in sorted order, which the zero-padded shard numbers make the same).
"""
from __future__ import annotations

import ast
import functools
import json
import os
import re
from pathlib import Path

from vim.utils import atomic_write

__all__ = ['EMBEDDING', 'FeatureError', 'NPY_HEADER_BYTES', 'array_path', 'check_meta', 'image_key', 'npy_header',
           'open_path', 'parquet_path', 'read_npy_header', 'record_path', 'shard_number']

EMBEDDING = 'embedding'  # the pooled embedding's name in dicts; its folder is img_emb (clip-retrieval's name)
NPY_HEADER_BYTES = 128  # fixed, so that the row count can be rewritten in place when a shard is sealed
META = 'meta.json'


class FeatureError(ValueError):
    """Bad input or an output folder that cannot be used: the message says what and what to do."""


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


def image_key(path: str | Path) -> str:
    """The key of an image file (or tar): its absolute path, with the folder's symbolic links resolved (one
    realpath per folder, not per file); a tar member's key is ``image_key(tar) + '/' + member``."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    return os.path.join(_real_folder(os.path.dirname(path)), os.path.basename(path))


def _stem(name: str) -> str:
    return 'img_emb' if name == EMBEDDING else name


def array_path(out: Path, name: str, shard: int) -> Path:
    """The sealed ``.npy`` of feature ``name`` ('embedding' or 'layer_i') in ``shard``."""
    return out / _stem(name) / f'{_stem(name)}_{shard:06d}.npy'


def open_path(out: Path, name: str, shard: int) -> Path:
    """The same array while its shard is being filled."""
    return out / _stem(name) / f'.{_stem(name)}_{shard:06d}.npy.open'


def parquet_path(out: Path, shard: int) -> Path:
    return out / 'metadata' / f'metadata_{shard:06d}.parquet'


def record_path(out: Path, shard: int) -> Path:
    return out / 'metadata' / f'.metadata_{shard:06d}.jsonl'


def shard_number(path: Path) -> int:
    """metadata_000012.parquet, .metadata_000012.jsonl, .img_emb_000012.npy.open -> 12."""
    return int(re.search(r'_(\d+)\.', path.name)[1])


def npy_header(shape: tuple[int, ...]) -> bytes:
    """A version 1.0 ``.npy`` header for float32 C-order ``shape``, padded to exactly NPY_HEADER_BYTES."""
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    pad = NPY_HEADER_BYTES - 10 - len(text) - 1
    if pad < 0:
        raise ValueError(f'shape {shape} does not fit a {NPY_HEADER_BYTES}-byte npy header')
    body = (text + ' ' * pad + '\n').encode('latin1')
    return b'\x93NUMPY\x01\x00' + len(body).to_bytes(2, 'little') + body


def read_npy_header(head: bytes) -> tuple[int, ...]:
    """The shape written by ``npy_header``."""
    if head[:8] != b'\x93NUMPY\x01\x00':
        raise ValueError('not an npy v1.0 header')
    length = int.from_bytes(head[8:10], 'little')
    return tuple(ast.literal_eval(head[10:10 + length].decode('latin1'))['shape'])


def check_meta(out: Path, meta: dict) -> None:
    """Write ``meta.json`` on first use; raise FeatureError if the folder holds features made otherwise."""
    if (out / 'index.json').exists():
        raise FeatureError(f'{out} holds features in the older index.json layout; choose another output folder '
                           'or delete that one')
    path = out / META
    if not path.exists():
        atomic_write(path, json.dumps(meta, indent=1).encode())
        return
    there = json.loads(path.read_text())
    differ = {k: (there.get(k), v) for k, v in meta.items() if k != 'weights_note' and there.get(k) != v}
    if differ:
        raise FeatureError(f'{out} holds features made with other settings '
                           f'({"; ".join(f"{k}: {a} there, {b} now" for k, (a, b) in differ.items())}); '
                           'choose another output folder or delete that one')

