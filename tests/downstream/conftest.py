"""Tiny COCO- and ADE20k-format datasets (in the layouts the configs expect), official-layout checkpoints, and
helpers that shrink the repository's configs to a CPU-sized model while keeping everything else (heads, pyramid,
losses, metrics, optimizer) as is. Dataset location and input size go through the same code as the commands'
``--data-root`` and ``--img-size`` (:mod:`vim.mm.config`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageDraw

import vim  # noqa: F401  (registers the timm models)
from vim.mm.config import set_data_root, set_img_size
from vim.models import vim_to_official

REPO = Path(__file__).resolve().parents[2]
DET_CONFIGS = REPO / 'configs' / 'mmdet'
SEG_CONFIGS = REPO / 'configs' / 'mmseg'

# A CPU-sized Vim (the architecture of timm's `test_vim`, patch 16) and the input size used by the shrunk configs.
TINY_ARCH = dict(embed_dim=32, depth=4, d_state=4)
DET_SIZE = 128
SEG_SIZE = 128
# The two classes drawn ('person' and 'car', ids as in COCO); the json lists all 80 COCO names (ids 1..80 in
# mmdet's class order) so that the configs' 80-class CocoDataset and CocoMetric work unchanged.
DRAWN_CATEGORY_IDS = (1, 3)


def _shape_image(rng: np.random.Generator, h: int, w: int) -> tuple[Image.Image, list]:
    img = Image.fromarray(rng.integers(0, 80, (h, w, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    shapes = []
    for k in range(2):
        x0, y0 = int(rng.integers(4, w // 2)), int(rng.integers(4, h // 2))
        x1, y1 = x0 + int(rng.integers(w // 4, w // 2 - 2)), y0 + int(rng.integers(h // 4, h // 2 - 2))
        poly = [x0, y0, x1, y0 + 3, x1 - 2, y1, x0 + 2, y1 - 3]
        draw.polygon(poly, fill=(200, 60 + 120 * k, 40))
        shapes.append((k, poly))
    return img, shapes


@pytest.fixture(scope='session')
def coco_root(tmp_path_factory) -> Path:
    pytest.importorskip('mmdet', reason='the mm stack is installed by `make install-mm`')  # for its class names
    return make_coco(tmp_path_factory.mktemp('coco'))


@pytest.fixture(scope='session')
def ade_root(tmp_path_factory) -> Path:
    return make_ade(tmp_path_factory.mktemp('ade'))


def make_coco(root: Path) -> Path:
    """A COCO data_root as mmdet's configs expect it: train2017/, val2017/ and annotations/instances_{train,val}2017
    .json, each split the same 3 images (one non-square) with 2 polygons each."""
    for split in ('train2017', 'val2017'):
        (root / split).mkdir()
    (root / 'annotations').mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i, (h, w) in enumerate([(128, 128), (128, 128), (96, 128)]):
        img, shapes = _shape_image(rng, h, w)
        name = f'{i:04d}.jpg'
        for split in ('train2017', 'val2017'):
            img.save(root / split / name, quality=95)
        images.append(dict(id=i + 1, file_name=name, height=h, width=w))
        for k, poly in shapes:
            xs, ys = poly[0::2], poly[1::2]
            box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=DRAWN_CATEGORY_IDS[k],
                             segmentation=[[float(v) for v in poly]], bbox=[float(v) for v in box],
                             area=float(box[2] * box[3]), iscrowd=0))
    from mmdet.datasets import CocoDataset

    categories = [dict(id=i + 1, name=name) for i, name in enumerate(CocoDataset.METAINFO['classes'])]
    assert [categories[i - 1]['name'] for i in DRAWN_CATEGORY_IDS] == ['person', 'car']
    for split in ('train2017', 'val2017'):
        (root / 'annotations' / f'instances_{split}.json').write_text(
            json.dumps(dict(images=images, annotations=anns, categories=categories)))
    return root


def make_ade(root: Path) -> Path:
    """ADEChallengeData2016-style root: images/{training,validation}/*.jpg, annotations/*/*.png (0 = ignore)."""
    rng = np.random.default_rng(1)
    for split in ('training', 'validation'):
        (root / 'images' / split).mkdir(parents=True)
        (root / 'annotations' / split).mkdir(parents=True)
        for i, (h, w) in enumerate([(128, 128), (96, 160)]):
            img, shapes = _shape_image(rng, h, w)
            label = Image.new('L', (w, h), 1)  # class 1 (-> 0 after reduce_zero_label) as background
            draw = ImageDraw.Draw(label)
            for k, poly in shapes:
                draw.polygon(poly, fill=2 + k)
            draw.rectangle([0, 0, 3, 3], fill=0)  # a few ignored pixels
            img.save(root / 'images' / split / f'ADE_{split}_{i:08d}.jpg', quality=95)
            label.save(root / 'annotations' / split / f'ADE_{split}_{i:08d}.png')
    return root


def save_official_checkpoint(path: Path, model_name: str, **kwargs) -> dict:
    """Write a random model of ``model_name`` as an official hustvl/Vim release file; returns its 'model' dict."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, **kwargs)
    official = vim_to_official(model.state_dict())
    ema = {k: torch.zeros_like(v) for k, v in official.items()}  # must not be the one that is loaded
    torch.save(dict(model=official, model_ema=ema, optimizer={}, epoch=299,
                    args=argparse.Namespace(model=model_name, lr=5e-4)), path)
    return official


def tiny_det_config(cfg, work_dir: Path):
    """The repository's detection config with a CPU-sized backbone, proposal and RoI counts and one iteration; data
    location and input size left as the config has them (set them with :func:`shrink_det_config` or the options)."""
    cfg.work_dir = str(work_dir)
    cfg.model.backbone.update(arch=TINY_ARCH, init_cfg=None)
    cfg.model.neck.in_channels = TINY_ARCH['embed_dim']
    cfg.train_dataloader.dataset.dataset.filter_cfg.min_size = 8
    cfg.train_dataloader.dataset.times = 1
    # CPU-sized proposal and RoI counts (the heads' convs over 512-1000 RoIs dominate the time otherwise), and
    # after one iteration every class score is ~1/81, under the default 0.05: keep boxes so CocoMetric has some.
    train_cfg, test_cfg = cfg.model.train_cfg, cfg.model.test_cfg
    train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=64)
    for stage in train_cfg.rcnn if isinstance(train_cfg.rcnn, list) else [train_cfg.rcnn]:
        stage.sampler.num = 32
    test_cfg.rpn.update(nms_pre=200, max_per_img=64)
    test_cfg.rcnn.update(score_thr=0.0, max_per_img=20)
    _cpu_loader_settings(cfg, batch_size=2)
    return cfg


def shrink_det_config(cfg, coco_root: Path, work_dir: Path):
    """:func:`tiny_det_config` on the tiny COCO set at 128² (what ``--data-root`` and ``--img-size 128`` do)."""
    tiny_det_config(cfg, work_dir)
    set_data_root(cfg, str(coco_root))
    set_img_size(cfg, DET_SIZE)
    return cfg


def tiny_seg_config(cfg, work_dir: Path):
    """The repository's segmentation config with a CPU-sized backbone and heads and one iteration; data location and
    input size left as the config has them."""
    dim = TINY_ARCH['embed_dim']
    cfg.work_dir = str(work_dir)
    cfg.model.backbone.update(arch=TINY_ARCH, out_indices=(0, 1, 2, 3), init_cfg=None)
    cfg.model.neck.embed_dim = dim
    cfg.model.decode_head.update(in_channels=[dim] * 4, channels=dim)
    cfg.model.auxiliary_head.in_channels = dim
    _cpu_loader_settings(cfg, batch_size=2)
    return cfg


def shrink_seg_config(cfg, ade_root: Path, work_dir: Path):
    """:func:`tiny_seg_config` on the tiny ADE set with 128² crops (what ``--data-root`` and ``--img-size 128`` do)."""
    tiny_seg_config(cfg, work_dir)
    set_data_root(cfg, str(ade_root))
    set_img_size(cfg, SEG_SIZE)
    return cfg


def _cpu_loader_settings(cfg, batch_size: int) -> None:
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[name].update(num_workers=0, persistent_workers=False)
    cfg.train_dataloader.batch_size = batch_size
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=1, val_interval=1)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1, log_metric_by_epoch=False)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False, interval=1)
    cfg.default_hooks.visualization = dict(type=cfg.default_hooks.visualization.type, draw=False)
    cfg.log_processor = dict(type='LogProcessor', window_size=1, by_epoch=False)
    cfg.randomness = dict(seed=0)
    cfg.env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
                       dist_cfg=dict(backend='gloo'))
