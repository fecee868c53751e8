"""--data-root and --img-size (vim.mm.config) on every repository config, and on small hand-written configs."""
from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from tests.downstream.conftest import DET_CONFIGS, SEG_CONFIGS
from vim.mm.config import leaf_datasets, set_data_root, set_img_size

DET_NAMES = sorted(p.name for p in DET_CONFIGS.glob('*.py'))
SEG_NAMES = sorted(p.name for p in SEG_CONFIGS.glob('*.py'))
ALL_CONFIGS = [DET_CONFIGS / n for n in DET_NAMES] + [SEG_CONFIGS / n for n in SEG_NAMES]


def _leaves(node: Any, path: str = '') -> Iterator[tuple[str, Any]]:
    """Every (key path, value) of a config tree; size pairs are leaves."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _leaves(v, f'{path}.{k}' if path else str(k))
    elif isinstance(node, (list, tuple)) and not all(isinstance(v, int) for v in node):
        for i, v in enumerate(node):
            yield from _leaves(v, f'{path}.{i}')
    else:
        yield path, node


@functools.cache
def _original(config: str, test: bool):
    """The config as the command builds it without the options (read-only in the tests)."""
    return _build([config, 'ckpt.pth', '--out', 'preds.pkl'] if test else [config], test=test)


def _build(argv: list[str], test: bool = False):
    pytest.importorskip('mmdet', reason='the mm stack is installed by `make install-mm`')
    pytest.importorskip('mmseg', reason='the mm stack is installed by `make install-mm`')
    from vim.mm import cli

    if test:
        return cli.build_test_config(cli.test_parser().parse_args(argv))
    return cli.build_train_config(cli.train_parser().parse_args(argv))


@pytest.mark.parametrize('config', ALL_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize('command', ['train', 'test'])
def test_data_root_reaches_every_dataset_and_annotation_file(config, command, tmp_path):
    root = str(tmp_path / 'datasets' / 'here')
    argv = [str(config), 'ckpt.pth', '--out', 'preds.pkl'] if command == 'test' else [str(config)]
    original = _original(str(config), command == 'test')
    cfg = _build(argv + ['--data-root', root], test=command == 'test')
    detection = cfg.default_scope == 'mmdet'
    old_root = original.val_dataloader.dataset.data_root
    assert old_root == ('data/coco/' if detection else 'data/ade/ADEChallengeData2016')
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        datasets = list(leaf_datasets(cfg[loader].dataset, f'{loader}.dataset'))
        assert datasets and all(d.data_root == root for _, d in datasets), loader
    if detection:  # the RepeatDataset nesting, and CocoMetric's own path (test_mm adds a DumpResults evaluator)
        assert cfg.train_dataloader.dataset.type == 'RepeatDataset'
        assert cfg.train_dataloader.dataset.dataset.data_root == root
        assert cfg.val_evaluator.ann_file == f'{root}/annotations/instances_val2017.json'
        coco_metrics = [m for m in (cfg.test_evaluator if command == 'test' else [cfg.test_evaluator])
                        if m['type'] == 'CocoMetric']
        assert [m['ann_file'] for m in coco_metrics] == [f'{root}/annotations/instances_val2017.json']
    # nothing in the whole config still points at the old location
    stale = [(path, v) for path, v in _leaves(cfg.to_dict()) if isinstance(v, str) and v.startswith(old_root)]
    assert stale == []
    # and nothing else changed
    assert cfg.model == original.model and cfg.train_dataloader.dataset.get('times') == \
        original.train_dataloader.dataset.get('times')


def test_cfg_options_data_root_is_refused_with_the_option_to_use():
    with pytest.raises(ValueError, match='--data-root'):
        _build([str(DET_CONFIGS / DET_NAMES[0]), '--cfg-options', 'data_root=/elsewhere/'])
    with pytest.raises(ValueError, match='--img-size'):
        _build([str(SEG_CONFIGS / SEG_NAMES[0]), '--cfg-options', 'crop_size=(256,256)'])


def test_cfg_options_win_over_the_options(tmp_path):
    """The file, then --data-root and --img-size, then --cfg-options: the most specific wins."""
    cfg = _build([str(DET_CONFIGS / DET_NAMES[0]), '--data-root', str(tmp_path), '--img-size', '512',
                  '--cfg-options', f'val_evaluator.ann_file={tmp_path}/other.json',
                  'model.backbone.img_size=(640,640)'])
    assert cfg.val_evaluator.ann_file == f'{tmp_path}/other.json'
    assert tuple(cfg.model.backbone.img_size) == (640, 640)
    assert tuple(cfg.model.data_preprocessor.batch_augments[0].size) == (512, 512)


@pytest.mark.parametrize('config', ALL_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize('img_size', [384])
def test_img_size_sets_every_size_consistently(config, img_size):
    original = _original(str(config), False)
    cfg = _build([str(config), '--img-size', str(img_size)])
    s = img_size
    assert tuple(cfg.model.backbone.img_size) == (s, s)
    train = list(leaf_datasets(cfg.train_dataloader.dataset, 'train'))[0][1].pipeline
    test = cfg.test_dataloader.dataset.pipeline
    by_type = {t.type: t for t in train}
    assert tuple(by_type['RandomCrop'].crop_size) == (s, s)
    if cfg.default_scope == 'mmdet':  # large-scale jitter at s² and a fixed s² pad
        assert tuple(by_type['RandomResize'].scale) == (s, s)
        assert tuple(cfg.model.data_preprocessor.batch_augments[0].size) == (s, s)
        assert [tuple(t.scale) for t in test if t.type == 'Resize'] == [(s, s)]
        old = 1024
    else:  # ADE20k's (2048, 512) resize range at 4:1, s² crops, sliding window of s² with 2/3 overlap
        assert tuple(by_type['RandomResize'].scale) == (4 * s, s)
        assert tuple(cfg.model.data_preprocessor.size) == (s, s)
        assert [tuple(t.scale) for t in test if t.type == 'Resize'] == [(4 * s, s)]
        assert tuple(cfg.model.test_cfg.crop_size) == (s, s)
        assert tuple(cfg.model.test_cfg.stride) == (round(341 * s / 512),) * 2
        old = 512
    # no size of the original resolution is left anywhere (a key the option forgot would keep it)
    sizes_before = {p for p, v in _leaves(original.to_dict()) if isinstance(v, (list, tuple)) and old in v}
    assert sizes_before, 'the check below would be empty'
    stale = [(p, v) for p, v in _leaves(cfg.to_dict()) if isinstance(v, (list, tuple)) and old in v]
    assert stale == []
    # the ratio ranges and everything that is not a size stay as they are
    assert by_type['RandomResize'].ratio_range == [t for t in list(leaf_datasets(
        original.train_dataloader.dataset, 'train'))[0][1].pipeline if t.type == 'RandomResize'][0].ratio_range


@pytest.mark.parametrize('config, img_size, match', [
    (DET_CONFIGS / 'mask-rcnn_vim-tiny_sfp_lsj-1024_coco.py', 200, 'multiple of the patch stride'),
    (DET_CONFIGS / 'mask-rcnn_vim-tiny_sfp_lsj-1024_coco.py', 208, 'pad_size_divisor'),
    (SEG_CONFIGS / 'upernet_vim-tiny_4xb4-160k_ade20k-512x512.py', 0, 'positive multiple'),
])
def test_img_size_that_does_not_tile_is_refused(config, img_size, match):
    with pytest.raises(ValueError, match=match):
        _build([str(config), '--img-size', str(img_size)])


def test_shared_objects_are_rewritten_once_and_wrappers_are_followed():
    """Plain dicts: `test_dataloader = val_dataloader` (one object) is scaled and moved once; ConcatDataset and
    RepeatDataset are followed; an evaluator file outside the old root is an error, not a guess."""
    pipeline = [dict(type='Resize', scale=(1024, 1024)), dict(type='TestTimeAug', transforms=[
        [dict(type='Resize', scale=(2048, 1024))], [dict(type='RandomFlip')]])]
    val = dict(dataset=dict(type='CocoDataset', data_root='data/coco/', pipeline=pipeline))
    metric = dict(type='CocoMetric', ann_file='data/coco/annotations/val.json')
    cfg = dict(
        model=dict(backbone=dict(img_size=1024), data_preprocessor=dict(pad_size_divisor=32)),
        train_dataloader=dict(dataset=dict(type='RepeatDataset', dataset=dict(type='ConcatDataset', datasets=[
            dict(type='CocoDataset', data_root='data/coco/'), dict(type='CocoDataset', data_root='data/more/')]))),
        val_dataloader=val, test_dataloader=val, val_evaluator=metric, test_evaluator=metric,
        test_pipeline=pipeline, image_size=(1024, 1024), data_root='data/coco/')
    changed = set_img_size(cfg, 512)
    assert pipeline[0]['scale'] == (512, 512) and pipeline[1]['transforms'][0][0]['scale'] == (1024, 512)
    assert cfg['image_size'] == (512, 512) and cfg['model']['backbone']['img_size'] == 512
    assert 'val_dataloader.dataset.pipeline.0.scale' in changed
    keys = set_data_root(cfg, '/d')
    assert keys == ['train_dataloader.dataset.dataset.datasets.0.data_root',
                    'train_dataloader.dataset.dataset.datasets.1.data_root', 'val_dataloader.dataset.data_root',
                    'test_dataloader.dataset.data_root', 'val_evaluator.ann_file', 'data_root']
    assert metric['ann_file'] == '/d/annotations/val.json' and val['dataset']['data_root'] == '/d'
    cfg['val_evaluator'] = dict(type='CocoMetric', ann_file='/somewhere/else/val.json')
    with pytest.raises(ValueError, match='val_evaluator.ann_file'):
        set_data_root(cfg, '/e')
    with pytest.raises(ValueError, match='square'):
        set_img_size(dict(model=dict(backbone=dict(img_size=(512, 1024)))), 256)
