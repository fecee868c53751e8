"""Where the images come from: files, folders, globs, list files and WebDataset-style .tar shards, decoded in
DataLoader workers into batches of equal-size images.

An image is named by its key: its absolute path, or ``<absolute tar path>/<member name>`` for a member of a tar.
Tars are listed once (headers only: an uncompressed tar is read by seeking over the members' data) and streamed
member by member when decoded, never unpacked to disk.
"""
from __future__ import annotations

import glob
import io
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.readers.img_extensions import get_img_extensions

from .layout import FeatureError, image_key

__all__ = ['IMG_EXTENSIONS', 'TAR_SUFFIXES', 'ImageStream', 'collect_images', 'plan_units', 'tile']

IMG_EXTENSIONS = tuple(sorted(set(get_img_extensions()) | {'.bmp', '.webp', '.tif', '.tiff'}))
TAR_SUFFIXES = ('.tar', '.tar.gz', '.tgz')
Unit = tuple[str, dict[str, str] | None]  # a file (None) or a tar and {member name: key} of the images wanted


def _is_tar(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


def _wanted(name: str) -> bool:
    low = name.lower()
    return low.endswith(IMG_EXTENSIONS) or low.endswith(TAR_SUFFIXES)


def _list_tar(tar: str, found: dict[str, tuple[str, str | None]], failures: dict[str, str]) -> None:
    try:
        with tarfile.open(tar, 'r:*') as tf:
            for m in tf:
                if m.isfile() and m.name.lower().endswith(IMG_EXTENSIONS):
                    found[f'{tar}/{m.name}'] = (tar, m.name)
    except (tarfile.TarError, OSError, EOFError) as e:  # the members listed before the damage are kept
        failures[tar] = f'unreadable tar ({type(e).__name__}: {e})'


def collect_images(inputs: list[str | Path]) -> tuple[dict[str, tuple[str, str | None]], dict[str, str]]:
    """({key: (file or tar, member or None)} sorted by key, {tar: why it could not be listed}) for the images named
    by files, folders (recursive: images and tars), globs, .txt/.lst lists (one path per line, relative to the
    list) and tars. Raises FeatureError for an input that does not exist.

    Folders are walked with os.walk (file types from the directory entries, no stat per file) and keys are made
    with one realpath per folder (``layout.image_key``): listing a million files costs seconds, not minutes."""
    files: list[str] = []
    for item in inputs:
        path = os.path.expanduser(str(item))
        if os.path.isdir(path):
            for folder, subfolders, names in os.walk(path, followlinks=True):
                subfolders.sort()
                files += [os.path.join(folder, n) for n in sorted(names) if _wanted(n)]
        elif os.path.isfile(path) and path.lower().endswith(('.txt', '.lst')):
            parent = os.path.dirname(path)
            lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
            files += [os.path.join(parent, ln) for ln in lines if ln and not ln.startswith('#')]
        elif os.path.isfile(path):
            files.append(path)
        elif any(c in path for c in '*?['):
            files += [f for f in sorted(glob.glob(path, recursive=True)) if os.path.isfile(f)]
        else:
            raise FeatureError(f'input {str(item)!r} does not exist')
    found: dict[str, tuple[str, str | None]] = {}
    failures: dict[str, str] = {}
    for f in dict.fromkeys(map(image_key, files)):
        if _is_tar(f):
            _list_tar(f, found, failures)
        else:
            found[f] = (f, None)
    return dict(sorted(found.items())), failures


def plan_units(keys: list[str], where: dict[str, tuple[str, str | None]]) -> list[Unit]:
    """The work units of ``keys``: each file alone, and each tar once with the members wanted from it."""
    units: dict[str, dict[str, str] | None] = {}
    for key in keys:
        path, member = where[key]
        if member is None:
            units[path] = None
        else:
            units.setdefault(path, {})[member] = key
    return list(units.items())


def tile(size: float, patch: int, stride: int, cap: int | None = None) -> int:
    """The nearest size of the form patch + k * stride (k >= 0), no larger than ``cap``."""
    out = patch + max(0, round((size - patch) / stride)) * stride
    while cap is not None and out > cap and out > patch:
        out -= stride
    return out


class ImageStream(torch.utils.data.IterableDataset):
    """Batches {'keys': [B], 'x': (B, 3, H, W) float32 or None, 'failed': [(key, reason)]} of equal-size images.

    ``size_of(h, w) -> (H, W)`` is the input size of an image of h x w pixels (after EXIF rotation). Each DataLoader
    worker decodes its share of ``units`` and batches images of the same size together; a batch is smaller only
    at the end, or when more than ``4 * batch_size`` images of other sizes wait (the fullest size goes then).
    ``data_cfg``: the model's mean, std and interpolation (timm).
    """

    def __init__(self, units: list[Unit], size_of: Callable[[int, int], tuple[int, int]], data_cfg: dict,
                 batch_size: int) -> None:
        self.units, self.size_of, self.data_cfg, self.batch_size = units, size_of, data_cfg, batch_size
        self.max_pending = 4 * batch_size  # images waiting for a full batch of their size, before a partial one
        self.transforms: dict[tuple[int, int], Callable] = {}

    def _prepare(self, key: str, opener: Callable) -> tuple[torch.Tensor | None, str | None]:
        try:
            with opener() as im:
                im = ImageOps.exif_transpose(im).convert('RGB')
                size = self.size_of(im.height, im.width)
                if size not in self.transforms:  # resize the whole image to `size` (no crop), the model's mean/std
                    self.transforms[size] = create_transform(
                        **dict(self.data_cfg, input_size=(3, *size), crop_pct=1.0, crop_mode='squash'))
                x = self.transforms[size](im)
        except Exception as e:  # corrupt, truncated, not an image, a mode with no RGB conversion, ...
            return None, f'{type(e).__name__}: {e}'
        if not torch.isfinite(x).all():
            return None, 'non-finite values after preprocessing'
        return x, None

    def _decode(self, unit: Unit) -> Iterator[tuple[str, torch.Tensor | None, str | None]]:
        path, members = unit
        if members is None:
            yield path, *self._prepare(path, lambda: Image.open(path))
            return
        left = dict(members)
        try:
            with tarfile.open(path, 'r|*') as tf:  # streamed: members in archive order, data read once
                for m in tf:
                    key = left.get(m.name)
                    if key is not None:
                        data = tf.extractfile(m).read()
                        del left[m.name]  # only once read: a member cut short is reported below
                        yield key, *self._prepare(key, lambda d=data: Image.open(io.BytesIO(d)))
                    if not left:
                        break
            why = 'not found in the tar'
        except (tarfile.TarError, OSError, EOFError) as e:
            why = f'the tar could not be read to this member ({type(e).__name__}: {e})'
        for key in left.values():
            yield key, None, why

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        units = self.units if info is None else self.units[info.id::info.num_workers]
        buckets: dict[tuple[int, ...], list[tuple[str, torch.Tensor]]] = {}
        failed: list[tuple[str, str]] = []
        for unit in units:
            for key, x, err in self._decode(unit):
                if x is None:
                    failed.append((key, err))
                    continue
                bucket = buckets.setdefault(tuple(x.shape), [])
                bucket.append((key, x))
                if len(bucket) == self.batch_size:
                    yield self._batch(buckets.pop(tuple(x.shape)), failed)
                    failed = []
                elif sum(map(len, buckets.values())) > self.max_pending:  # many sizes: bound the memory held
                    yield self._batch(buckets.pop(max(buckets, key=lambda k: len(buckets[k]))), failed)
                    failed = []
        for bucket in buckets.values():
            yield self._batch(bucket, failed)
            failed = []
        if failed:
            yield self._batch([], failed)

    @staticmethod
    def _batch(items: list[tuple[str, torch.Tensor]], failed: list[tuple[str, str]]) -> dict:
        return dict(keys=[k for k, _ in items], x=torch.stack([x for _, x in items]) if items else None,
                    failed=failed)
