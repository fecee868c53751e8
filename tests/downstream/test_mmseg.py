"""The repository's mmseg configs: build, one training iteration, inference and IoU evaluation; ImageNet weights
through init_cfg with pos_embed resampled around the middle class token to 512² (stride 16 and stride 8)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip('mmseg', reason='the mm stack is installed by `make install-mm`')

from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from tests.downstream.conftest import SEG_CONFIGS, TINY_ARCH, save_official_checkpoint, shrink_seg_config  # noqa: E402

SEG_CONFIG_NAMES = [
    'upernet_vim-tiny_4xb4-160k_ade20k-512x512.py',
    'upernet_vim-small_4xb4-160k_ade20k-512x512.py',
    'upernet_vim-tiny-p16s8_4xb4-160k_ade20k-512x512.py',
]


@pytest.mark.parametrize('name', SEG_CONFIG_NAMES)
def test_config_describes_the_recipe(name):
    cfg = Config.fromfile(SEG_CONFIGS / name)
    assert 'Paper number' in (SEG_CONFIGS / name).read_text().split('_base_')[0]
    backbone = cfg.model.backbone
    assert backbone.type == 'VisionMambaSeg' and tuple(backbone.img_size) == (512, 512)
    assert tuple(backbone.out_indices) == (5, 11, 17, 23)
    assert cfg.model.neck.type == 'Feature2Pyramid'
    stride8 = backbone.get('stride') == 8
    assert list(cfg.model.neck.rescales) == ([2, 1, 0.5, 0.25] if stride8 else [4, 2, 1, 0.5])
    assert cfg.model.decode_head.type == 'UPerHead' and cfg.model.auxiliary_head.type == 'FCNHead'
    assert cfg.train_cfg.max_iters == 160000
    assert cfg.optim_wrapper.constructor == 'VimLayerDecayOptimizerConstructor'
    assert cfg.optim_wrapper.paramwise_cfg.decay_rate == 0.92


@pytest.mark.parametrize('name', [SEG_CONFIG_NAMES[0], SEG_CONFIG_NAMES[2]])
def test_train_one_iteration_then_evaluate(name, ade_root, tmp_path):
    cfg = shrink_seg_config(Config.fromfile(SEG_CONFIGS / name), ade_root, tmp_path)
    runner = Runner.from_cfg(cfg)
    before = runner.model.backbone.layers[0].mixer.in_proj.weight.detach().clone()
    runner.train()  # one iteration (loss incl. the auxiliary head, backward, AdamW step), then IoUMetric validation
    assert not torch.equal(before, runner.model.backbone.layers[0].mixer.in_proj.weight.detach())
    assert math.isfinite(runner.message_hub.get_scalar('train/loss').current())
    assert runner.message_hub.get_scalar('val/mIoU') is not None  # the validation after the iteration
    metrics = runner.test()  # slide inference over non-square images + IoUMetric
    assert {'mIoU', 'aAcc', 'mAcc'} <= set(metrics)
    assert 0.0 <= metrics['aAcc'] <= 100.0


def test_stride8_features_align_with_the_pyramid():
    """Stride 8: inputs padded by 4 px per side so the token grid is exactly H/8 x W/8, also non-square."""
    init_default_scope('mmseg')
    from mmseg.registry import MODELS

    import vim.mmseg  # noqa: F401

    backbone = MODELS.build(dict(type='VisionMambaSeg', arch=TINY_ARCH, img_size=64, stride=8,
                                 out_indices=(1, 3)))
    assert backbone.patch_embed.grid_size == (8, 8)
    feats = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 32, 8, 12)] * 2
    neck = MODELS.build(dict(type='Feature2Pyramid', embed_dim=32, rescales=[2, 1, 0.5, 0.25],
                             norm_cfg=dict(type='BN')))
    outs = neck(feats + feats)  # four levels from the two maps
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 24), (8, 12), (4, 6), (2, 3)]


@pytest.mark.parametrize('model_name, stride, old, new', [
    ('vim_tiny_patch16_224', 16, 14, 32),
    ('vim_tiny_patch16_stride8_224', 8, 27, 64),
])
def test_official_weights_through_init_cfg_at_512(tmp_path, model_name, stride, old, new):
    path = tmp_path / 'official.pth'
    official = save_official_checkpoint(path, model_name, depth=2)
    init_default_scope('mmseg')
    from mmseg.registry import MODELS

    import vim.mmseg  # noqa: F401

    backbone = MODELS.build(dict(
        type='VisionMambaSeg', arch=dict(embed_dim=192, depth=2), img_size=512, stride=stride, out_indices=(0, 1),
        init_cfg=dict(type='Pretrained', checkpoint=str(path))))
    backbone.init_weights()
    pos = backbone.pos_embed.detach()
    cls_old, cls_new = old * old // 2, new * new // 2
    assert pos.shape == (1, new * new + 1, 192)
    torch.testing.assert_close(pos[:, cls_new], official['pos_embed'][:, cls_old], rtol=0, atol=0)
    patches = torch.cat([official['pos_embed'][:, :cls_old], official['pos_embed'][:, cls_old + 1:]], dim=1)
    torch.testing.assert_close(torch.cat([pos[:, :cls_new], pos[:, cls_new + 1:]], dim=1),
                               _plain_bicubic(patches, (old, old), (new, new)))
    # the seg backbone has no final norm: the checkpoint's norm_f and head are skipped, everything else loaded
    assert isinstance(backbone.norm, torch.nn.Identity)
    torch.testing.assert_close(backbone.patch_embed.proj.weight.detach(), official['patch_embed.proj.weight'])
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 64, 96))  # a small non-square input: pos_embed resampled on the fly
    assert [tuple(f.shape) for f in feats] == [(1, 192, 64 // stride, 96 // stride)] * 2


def test_per_input_resampling_is_plain_bicubic():
    """At an input size other than img_size the backbone resamples pos_embed as mmseg's ViT and ViTDet do (plain
    bicubic), not with timm's antialiased default."""
    init_default_scope('mmseg')
    from mmseg.registry import MODELS

    import vim.mmseg  # noqa: F401

    backbone = MODELS.build(dict(type='VisionMambaSeg', arch=TINY_ARCH, img_size=128, out_indices=(0,))).eval()
    with torch.no_grad():
        backbone.cls_token.zero_()
        pos = backbone.pos_embed.detach().clone()
        per_input = backbone._pos_embed(torch.zeros(1, 6 * 10, TINY_ARCH['embed_dim']), (6, 10))
    cls_idx = 8 * 8 // 2
    patches = torch.cat([pos[:, :cls_idx], pos[:, cls_idx + 1:]], dim=1)
    torch.testing.assert_close(torch.cat([per_input[:, :30], per_input[:, 31:]], dim=1),
                               _plain_bicubic(patches, (8, 8), (6, 10)))
    torch.testing.assert_close(per_input[:, 30], pos[:, cls_idx], rtol=0, atol=0)


def _plain_bicubic(patches: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """(1, old_h * old_w, C) patch rows -> (1, new_h * new_w, C) with plain F.interpolate (the official recipes)."""
    img = patches.reshape(1, *old, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=new, mode='bicubic', align_corners=False)
    return img.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1)


def test_scan_recompute_reaches_every_mixer():
    """``scan_recompute`` in a config (model.backbone.scan_recompute=True) sets VisionMamba.set_scan_recompute."""
    init_default_scope('mmseg')
    from mmseg.registry import MODELS

    import vim.mmseg  # noqa: F401
    for flag in (False, True):
        backbone = MODELS.build(dict(type='VisionMambaSeg', arch=TINY_ARCH, img_size=64, out_indices=(1, 3),
                                     scan_recompute=flag))
        assert [b.mixer.scan_recompute for b in backbone.layers] == [flag] * len(backbone.layers)
