"""Whole-config rewrites behind ``--data-root`` and ``--img-size`` of ``vim-train-mm`` / ``vim-test-mm``.

An mmengine config resolves its variables when the file is read: by then ``data_root`` and ``image_size`` /
``crop_size`` have been copied into many keys (nested dataset wrappers, the evaluators' annotation files, the
pipelines, the data preprocessor, the backbone, the sliding-window test), so overriding the variable with
``--cfg-options data_root=...`` changes nothing. These functions rewrite the keys themselves and return the paths
of the keys they changed. Neither needs mmengine itself: a config is a tree of dicts and lists.
"""
from __future__ import annotations

import os.path as osp
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from mmengine.config import Config

# An mmengine Config (dict-like, not a Mapping) or a plain dict of dicts.
ConfigLike = Union['Config', MutableMapping]

__all__ = ['set_data_root', 'set_img_size', 'leaf_datasets', 'DATALOADERS']

DATALOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')
_EVALUATOR_LOADERS = {'val_evaluator': 'val_dataloader', 'test_evaluator': 'test_dataloader'}

# Pipeline transforms and their size keys (mmcv / mmdet / mmseg transforms; Resize scales are (w, h), crops (h, w):
# with a square training size both are scaled alike).
_TRANSFORM_SIZE_KEYS = {
    'Resize': ('scale',),
    'RandomResize': ('scale',),
    'RandomChoiceResize': ('scales',),
    'RandomCrop': ('crop_size',),
    'Pad': ('size',),
}
# Top-level variables that mirror the training size (rewritten so that a dumped config tells the truth).
_SIZE_VARIABLES = ('image_size', 'crop_size', 'img_scale')
_PIPELINE_VARIABLES = ('train_pipeline', 'val_pipeline', 'test_pipeline')


def leaf_datasets(node: MutableMapping, path: str) -> Iterator[tuple[str, MutableMapping]]:
    """The datasets under a dataset config, through wrappers (``dataset``: RepeatDataset, ClassBalancedDataset,
    MultiImageMixDataset; ``datasets``: ConcatDataset), as (key path, dict) pairs."""
    if node.get('dataset') is not None:
        yield from leaf_datasets(node['dataset'], f'{path}.dataset')
    elif node.get('datasets') is not None:
        for i, child in enumerate(node['datasets']):
            yield from leaf_datasets(child, f'{path}.datasets.{i}')
    else:
        yield path, node


def _loader_datasets(cfg: ConfigLike) -> Iterator[tuple[str, str, MutableMapping]]:
    for loader in DATALOADERS:
        if cfg.get(loader) is not None and cfg[loader].get('dataset') is not None:
            for path, dataset in leaf_datasets(cfg[loader]['dataset'], f'{loader}.dataset'):
                yield loader, path, dataset


def _is_under(path: str, root: str) -> bool:
    rel = osp.relpath(osp.normpath(path), osp.normpath(root))
    return rel != osp.pardir and not rel.startswith(osp.pardir + osp.sep)


def set_data_root(cfg: ConfigLike, data_root: str) -> list[str]:
    """Point every dataset of the config at ``data_root``, keeping the layout below it.

    Sets ``data_root`` of every dataset of the train, val and test dataloaders (through wrappers: detection's
    ``train_dataloader.dataset.dataset.data_root``); their ``ann_file`` and ``data_prefix`` are relative to it in
    the OpenMMLab configs and stay as they are. An evaluator's ``ann_file`` (mmdet's ``CocoMetric``) is a path of
    its own, ``<old data_root>/annotations/...``: it is moved to the same place under ``data_root``. One that is
    not under its dataloader's old ``data_root`` cannot be placed and is an error (set it with ``--cfg-options``
    and leave out ``--data-root``, or lay the files out as the config expects). The top-level ``data_root``
    variable, if any, is updated too. Returns the key paths changed.
    """
    old_roots: dict[str, str | None] = {}
    changed = []
    seen: set[int] = set()  # `test_evaluator = val_evaluator` may be one object: move its ann_file once
    for loader, path, dataset in _loader_datasets(cfg):
        old_roots.setdefault(loader, dataset.get('data_root'))
        dataset['data_root'] = data_root
        changed.append(f'{path}.data_root')
    if not changed:
        raise ValueError('--data-root: the config has no dataloader with a dataset')
    for evaluator_key, loader in _EVALUATOR_LOADERS.items():
        evaluators = cfg.get(evaluator_key)
        if evaluators is None:
            continue
        many = isinstance(evaluators, (list, tuple))
        for i, metric in enumerate(evaluators if many else [evaluators]):
            ann_file = metric.get('ann_file')
            if ann_file is None or id(metric) in seen:
                continue
            seen.add(id(metric))
            key = f'{evaluator_key}.{i}.ann_file' if many else f'{evaluator_key}.ann_file'
            old_root = old_roots.get(loader)
            if old_root is None or not _is_under(ann_file, old_root):
                raise ValueError(
                    f'--data-root: {key} = {ann_file!r} is not under the data_root of {loader} ({old_root!r}), so '
                    f'its place under {data_root!r} is unknown. Leave out --data-root and set the paths with '
                    f'--cfg-options (e.g. {key}=...), or keep the annotation file under the data root.')
            metric['ann_file'] = osp.join(data_root, osp.relpath(osp.normpath(ann_file), osp.normpath(old_root)))
            changed.append(key)
    if 'data_root' in cfg:
        cfg['data_root'] = data_root
        changed.append('data_root')
    return changed


def _scaled(value: Any, factor: float) -> Any:
    """An int, an (h, w)-like pair, or a list of pairs, times ``factor`` (rounded); None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return round(value * factor)
    if isinstance(value, (list, tuple)):
        return type(value)(_scaled(v, factor) for v in value)
    raise TypeError(f'cannot scale {value!r}')


class _Scaler:
    """Scales size keys in place, each (node, key) once: configs share objects (``test_dataloader =
    val_dataloader``, a pipeline variable and the dataset that uses it), which must not be scaled twice."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.changed: list[str] = []
        self._done: set[tuple[int, str]] = set()

    def key(self, node: Any, key: str, path: str) -> None:
        if hasattr(node, 'get') and node.get(key) is not None and (id(node), key) not in self._done:
            self._done.add((id(node), key))
            node[key] = _scaled(node[key], self.factor)
            self.changed.append(path)

    def transforms(self, transforms: Any, path: str) -> None:
        """The size keys of a (possibly nested: TestTimeAug, RandomChoice) pipeline list."""
        if isinstance(transforms, (list, tuple)):
            for i, t in enumerate(transforms):
                self.transforms(t, f'{path}.{i}')
        elif isinstance(transforms, MutableMapping):
            for key in _TRANSFORM_SIZE_KEYS.get(transforms.get('type'), ()):
                self.key(transforms, key, f'{path}.{key}')
            if transforms.get('transforms') is not None:
                self.transforms(transforms['transforms'], f'{path}.transforms')


def _square_size(value: Any, what: str) -> int:
    size = (value, value) if isinstance(value, int) else tuple(value)
    if len(size) != 2 or size[0] != size[1]:
        raise ValueError(f'--img-size scales a square training size; {what} is {value!r}')
    return int(size[0])


def set_img_size(cfg: ConfigLike, img_size: int) -> list[str]:
    """Train (or test) at ``img_size`` x ``img_size``: every size of the config scaled by ``img_size / old``.

    ``old`` is ``model.backbone.img_size`` (the training resolution, square). Scaled alike: the backbone's
    ``img_size`` (pretrained ``pos_embed`` is resampled to it at load time), the data preprocessor's ``size`` and
    its batch augments' ``size`` (mmdet's ``BatchFixedSizePad``), ``model.test_cfg.crop_size`` / ``stride``
    (mmseg's sliding window), the size keys of ``Resize``, ``RandomResize``, ``RandomChoiceResize``,
    ``RandomCrop`` and ``Pad`` in every dataset pipeline (so 1024² LSJ becomes ``img_size``² LSJ, and ADE20k's
    (2048, 512) resize range becomes (4, 1) x ``img_size``), and the top-level variables ``image_size``,
    ``crop_size``, ``data_preprocessor`` and ``*_pipeline``. Returns the key paths changed.
    """
    backbone = cfg['model']['backbone']
    old = _square_size(backbone.get('img_size'), 'model.backbone.img_size')
    stride = backbone.get('stride') or backbone.get('patch_size') or 16
    preprocessor = cfg['model'].get('data_preprocessor') or {}
    divisors = {'the patch stride': stride}
    for key in ('pad_size_divisor', 'size_divisor'):
        if preprocessor.get(key):
            divisors[f'model.data_preprocessor.{key}'] = preprocessor[key]
    for what, divisor in divisors.items():
        if img_size <= 0 or img_size % divisor:
            raise ValueError(f'--img-size {img_size} must be a positive multiple of {what} ({divisor})')
    scale = _Scaler(img_size / old)
    scale.key(backbone, 'img_size', 'model.backbone.img_size')
    for path, node in (('model.data_preprocessor', preprocessor), ('data_preprocessor', cfg.get('data_preprocessor'))):
        if isinstance(node, MutableMapping):
            scale.key(node, 'size', f'{path}.size')
            for i, augment in enumerate(node.get('batch_augments') or []):
                scale.key(augment, 'size', f'{path}.batch_augments.{i}.size')
    test_cfg = cfg['model'].get('test_cfg')
    if isinstance(test_cfg, MutableMapping) and test_cfg.get('mode') == 'slide':
        scale.key(test_cfg, 'crop_size', 'model.test_cfg.crop_size')
        scale.key(test_cfg, 'stride', 'model.test_cfg.stride')
    for _, path, dataset in _loader_datasets(cfg):
        scale.transforms(dataset.get('pipeline'), f'{path}.pipeline')
    for name in _PIPELINE_VARIABLES:
        scale.transforms(cfg.get(name), name)
    for name in _SIZE_VARIABLES:
        scale.key(cfg, name, name)
    return scale.changed
