"""VimLayerDecayOptimizerConstructor on the real segmentor and detector of the repository's configs."""
from __future__ import annotations

import pytest

pytest.importorskip('mmseg', reason='the mm stack is installed by `make install-mm`')
pytest.importorskip('mmdet', reason='the mm stack is installed by `make install-mm`')

from mmengine.config import Config  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

from tests.downstream.conftest import DET_CONFIGS, SEG_CONFIGS, TINY_ARCH  # noqa: E402


def _groups_by_param(model, optim_cfg):
    optim_wrapper = build_optim_wrapper(model, optim_cfg)
    by_name = {}
    for group in optim_wrapper.optimizer.param_groups:
        for name in group['param_names']:
            by_name[name] = group
    assert set(by_name) == {n for n, p in model.named_parameters() if p.requires_grad}
    return by_name


def _build(cfg, scope):
    init_default_scope(scope)
    import importlib

    importlib.import_module(cfg.custom_imports.imports[0])
    from mmengine.registry import MODELS

    return MODELS.build(cfg.model)


def test_rates_of_the_segmentor():
    cfg = Config.fromfile(SEG_CONFIGS / 'upernet_vim-tiny_4xb4-160k_ade20k-512x512.py')
    cfg.model.backbone.update(arch=TINY_ARCH, img_size=64, out_indices=(0, 1, 2, 3), init_cfg=None)
    cfg.model.neck.embed_dim = 32
    cfg.model.decode_head.update(in_channels=[32] * 4, channels=32)
    cfg.model.auxiliary_head.in_channels = 32
    model = _build(cfg, 'mmseg')
    groups = _groups_by_param(model, cfg.optim_wrapper)
    lr, wd, rate, depth = 1e-4, 0.05, 0.92, TINY_ARCH['depth']
    assert cfg.optim_wrapper.optimizer.lr == lr and cfg.optim_wrapper.optimizer.weight_decay == wd

    def check(name, scale, decay):
        group = groups[name]
        assert group['lr'] == pytest.approx(lr * scale), name
        assert group['weight_decay'] == (wd if decay else 0.0), name

    # embeddings: the lowest rate; pos_embed and cls_token never weight-decayed
    for name in ('backbone.patch_embed.proj.weight', 'backbone.pos_embed', 'backbone.cls_token'):
        check(name, rate ** (depth + 1), decay=name.endswith('proj.weight'))
    check('backbone.patch_embed.proj.bias', rate ** (depth + 1), decay=False)
    # block i: rate ** (depth - i); the mixers' D / conv / dt biases and norms without weight decay
    for i in range(depth):
        check(f'backbone.layers.{i}.mixer.in_proj.weight', rate ** (depth - i), decay=True)
        check(f'backbone.layers.{i}.mixer.A_log', rate ** (depth - i), decay=True)
        check(f'backbone.layers.{i}.mixer.D', rate ** (depth - i), decay=False)
        check(f'backbone.layers.{i}.mixer.dt_proj_bias', rate ** (depth - i), decay=False)
        check(f'backbone.layers.{i}.norm.weight', rate ** (depth - i), decay=False)
    # neck and heads: the base rate
    heads = [n for n in groups if not n.startswith('backbone.')]
    assert any(n.startswith('neck.') for n in heads) and any(n.startswith('auxiliary_head.') for n in heads)
    for name in heads:
        check(name, 1.0, decay=groups[name]['params'][groups[name]['param_names'].index(name)].ndim > 1)
    check('decode_head.conv_seg.weight', 1.0, decay=True)
    check('decode_head.conv_seg.bias', 1.0, decay=False)


def test_rates_of_the_detector():
    """The detector keeps the final norm (ViTDet's last-layer features): it shares the last block's rate."""
    cfg = Config.fromfile(DET_CONFIGS / 'cascade-mask-rcnn_vim-tiny_sfp_lsj-1024_coco.py')
    cfg.model.backbone.update(arch=TINY_ARCH, img_size=64, init_cfg=None)
    cfg.model.neck.in_channels = 32
    model = _build(cfg, 'mmdet')
    groups = _groups_by_param(model, cfg.optim_wrapper)
    lr, rate, depth = 1e-4, 0.8, TINY_ARCH['depth']
    assert groups['backbone.pos_embed']['lr'] == pytest.approx(lr * rate ** (depth + 1))
    assert groups['backbone.layers.0.mixer.out_proj.weight']['lr'] == pytest.approx(lr * rate ** depth)
    assert groups[f'backbone.layers.{depth - 1}.mixer.out_proj.weight']['lr'] == pytest.approx(lr * rate)
    assert groups['backbone.norm.weight']['lr'] == pytest.approx(lr * rate)
    for name in ('neck.stages.0.0.0.weight', 'rpn_head.rpn_conv.0.conv.weight',
                 'roi_head.bbox_head.2.fc_cls.weight', 'roi_head.mask_head.2.conv_logits.weight'):
        assert groups[name]['lr'] == pytest.approx(lr), name
        assert groups[name]['weight_decay'] == 0.1, name
