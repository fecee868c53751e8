"""The repository's mmdet configs: build, one training iteration, inference and COCO evaluation; ImageNet weights
through init_cfg with pos_embed resampled around the middle class token to 1024²."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip('mmdet', reason='the mm stack is installed by `make install-mm`')

from mmengine.config import Config  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from tests.downstream.conftest import DET_CONFIGS, TINY_ARCH, save_official_checkpoint, shrink_det_config  # noqa: E402

DET_CONFIG_NAMES = [
    'mask-rcnn_vim-tiny_sfp_lsj-1024_coco.py',
    'cascade-mask-rcnn_vim-tiny_sfp_lsj-1024_coco.py',
    'mask-rcnn_vim-small_sfp_lsj-1024_coco.py',
    'cascade-mask-rcnn_vim-small_sfp_lsj-1024_coco.py',
]


@pytest.mark.parametrize('name', DET_CONFIG_NAMES)
def test_config_describes_the_recipe(name):
    """Untouched configs: ViTDet pyramid on the last block at 1024², layer decay, paper number stated."""
    cfg = Config.fromfile(DET_CONFIGS / name)
    text = (DET_CONFIGS / name).read_text()
    assert 'Paper number' in text.split('_base_')[0]
    backbone = cfg.model.backbone
    assert backbone.type == 'VisionMambaDet' and tuple(backbone.img_size) == (1024, 1024)
    assert backbone.init_cfg.type == 'Pretrained' and backbone.init_cfg.checkpoint.endswith('_224.in1k')
    assert cfg.model.neck.type == 'SimpleFeaturePyramid'
    assert tuple(cfg.model.neck.scale_factors) == (4.0, 2.0, 1.0, 0.5) and cfg.model.neck.num_outs == 5
    assert cfg.model.neck.in_channels == (384 if 'small' in name else 192)
    assert cfg.optim_wrapper.constructor == 'VimLayerDecayOptimizerConstructor'
    assert cfg.custom_imports.imports == ['vim.mmdet']
    cascade = name.startswith('cascade')
    assert cfg.model.type == ('CascadeRCNN' if cascade else 'MaskRCNN')  # the detector the logs and checkpoints name
    assert cfg.model.roi_head.type == ('CascadeRoIHead' if cascade else 'StandardRoIHead')


@pytest.mark.parametrize('name', DET_CONFIG_NAMES[:1])  # the cascade one: test_tools, through vim-train-mm
def test_train_one_iteration_then_evaluate(name, coco_root, tmp_path):
    cfg = shrink_det_config(Config.fromfile(DET_CONFIGS / name), coco_root, tmp_path)
    runner = Runner.from_cfg(cfg)
    assert type(runner.model).__name__ == ('CascadeRCNN' if name.startswith('cascade') else 'MaskRCNN')
    before = runner.model.backbone.layers[0].mixer.in_proj.weight.detach().clone()
    runner.train()  # one iteration (loss, backward, AdamW step with layer decay), then validation
    after = runner.model.backbone.layers[0].mixer.in_proj.weight.detach()
    assert not torch.equal(before, after), 'the backbone did not receive gradients'
    losses = runner.message_hub.get_scalar('train/loss').current()
    assert math.isfinite(losses) and losses > 0
    # the validation after the iteration: inference on the 3 images (one non-square), then CocoMetric
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50'):
        value = runner.message_hub.get_scalar(f'val/{key}').current()
        assert 0.0 <= value <= 1.0, (key, value)


def test_predict_non_square_image(coco_root, tmp_path):
    """Inference on a non-square input (96x128 -> 96x128 padded to the size divisor) returns boxes and masks."""
    cfg = shrink_det_config(Config.fromfile(DET_CONFIGS / DET_CONFIG_NAMES[0]), coco_root, tmp_path)
    init_default_scope('mmdet')
    from mmdet.registry import MODELS

    model = MODELS.build(cfg.model).eval()
    from mmdet.structures import DetDataSample

    sample = DetDataSample(metainfo=dict(img_shape=(96, 128), ori_shape=(96, 128), scale_factor=(1.0, 1.0),
                                         pad_shape=(96, 128), batch_input_shape=(96, 128)))
    data = model.data_preprocessor(dict(inputs=[torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)],
                                        data_samples=[sample]), training=False)
    assert data['inputs'].shape[-2:] == (96, 128)
    with torch.no_grad():
        feats = model.extract_feat(data['inputs'])
        assert [tuple(f.shape[-2:]) for f in feats] == [(24, 32), (12, 16), (6, 8), (3, 4), (2, 2)]
        out = model.predict(data['inputs'], data['data_samples'])
    assert out[0].pred_instances.masks.shape[-2:] == (96, 128)


def test_bf16_backbone_train_step_and_predict(coco_root, tmp_path):
    """`--amp` for detection: the backbone under bf16 autocast, fp32 maps out, so anchors, boxes and mmcv's NMS and
    RoI ops stay fp32 (CPU autocast here; the same dtype rules as CUDA's)."""
    cfg = shrink_det_config(Config.fromfile(DET_CONFIGS / DET_CONFIG_NAMES[1]), coco_root, tmp_path)
    cfg.model.backbone.autocast_dtype = 'bfloat16'
    runner = Runner.from_cfg(cfg)
    model = runner.model
    data = model.data_preprocessor(next(iter(runner.train_dataloader)), True)
    seen = []
    model.backbone.layers[0].mixer.in_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    losses = model(**data, mode='loss')
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss)
    loss.backward()
    assert seen == [torch.bfloat16]
    assert model.backbone.layers[0].mixer.in_proj.weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model.test_step(next(iter(runner.val_dataloader)))
    assert out[0].pred_instances.bboxes.dtype == torch.float32


def _resample_by_hand(official_pos: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """Official (1, old² + 1, C) with the class row at old² // 2 -> ours at new², class row at new² // 2; the patch
    rows resized as the official recipes do (plain bicubic, align_corners=False, no antialias)."""
    cls_idx = old * old // 2
    patches = torch.cat([official_pos[:, :cls_idx], official_pos[:, cls_idx + 1:]], dim=1)
    img = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(new, new), mode='bicubic', align_corners=False)
    patches = img.permute(0, 2, 3, 1).reshape(1, new * new, -1)
    mid = new * new // 2
    return torch.cat([patches[:, :mid], official_pos[:, cls_idx:cls_idx + 1], patches[:, mid:]], dim=1)


def test_official_weights_through_init_cfg_at_1024(tmp_path):
    """An official Vim-Ti release file in init_cfg: class-token row moved from 98 (of 197) to 2048 (of 4097)."""
    path = tmp_path / 'vim_t_midclstok_76p1acc.pth'
    official = save_official_checkpoint(path, 'vim_tiny_patch16_224')
    init_default_scope('mmdet')
    from mmdet.registry import MODELS

    import vim.mmdet  # noqa: F401

    backbone = MODELS.build(dict(type='VisionMambaDet', arch='tiny', img_size=1024,
                                 init_cfg=dict(type='Pretrained', checkpoint=str(path))))
    backbone.init_weights()
    pos = backbone.pos_embed.detach()
    assert pos.shape == (1, 64 * 64 + 1, 192)
    torch.testing.assert_close(pos[:, 2048], official['pos_embed'][:, 98], rtol=0, atol=0)
    torch.testing.assert_close(pos, _resample_by_hand(official['pos_embed'], 14, 64))
    # not the row-0 convention of the official det/seg loaders
    assert not torch.allclose(pos[:, 0], official['pos_embed'][:, 98])
    torch.testing.assert_close(backbone.cls_token.detach(), official['cls_token'], rtol=0, atol=0)
    fwd, bwd = backbone.layers[3].mixer.A_log.detach()
    torch.testing.assert_close(fwd, official['layers.3.mixer.A_log'], rtol=0, atol=0)
    torch.testing.assert_close(bwd, official['layers.3.mixer.A_b_log'], rtol=0, atol=0)
    torch.testing.assert_close(backbone.norm.weight.detach(), official['norm_f.weight'], rtol=0, atol=0)


def test_backbone_and_neck_shapes_and_prefix_loading(tmp_path):
    """The det backbone emits one stride-16 map; the pyramid makes strides 4..64; a `backbone.` prefix is honoured."""
    init_default_scope('mmdet')
    from mmdet.registry import MODELS

    import vim.mmdet  # noqa: F401

    backbone = MODELS.build(dict(type='VisionMambaDet', arch=TINY_ARCH, img_size=128))
    neck = MODELS.build(dict(type='SimpleFeaturePyramid', in_channels=32, out_channels=16))
    x = torch.randn(1, 3, 128, 192)
    (feat,) = backbone(x)
    assert feat.shape == (1, 32, 8, 12)
    outs = neck((feat,))
    assert [tuple(o.shape) for o in outs] == [(1, 16, 32, 48), (1, 16, 16, 24), (1, 16, 8, 12), (1, 16, 4, 6),
                                              (1, 16, 2, 3)]
    wrapped = {f'backbone.{k}': v for k, v in backbone.state_dict().items()}
    wrapped['neck.dummy'] = torch.zeros(1)
    torch.save(wrapped, tmp_path / 'detector.pth')
    other = MODELS.build(dict(type='VisionMambaDet', arch=TINY_ARCH, img_size=128, init_cfg=dict(
        type='Pretrained', checkpoint=str(tmp_path / 'detector.pth'), prefix='backbone.')))
    other.init_weights()
    for k, v in backbone.state_dict().items():
        torch.testing.assert_close(other.state_dict()[k], v, rtol=0, atol=0)


def test_scan_recompute_reaches_every_mixer():
    """``scan_recompute`` in a config (model.backbone.scan_recompute=True) sets VisionMamba.set_scan_recompute."""
    init_default_scope('mmdet')
    from mmdet.registry import MODELS

    import vim.mmdet  # noqa: F401
    for flag in (False, True):
        backbone = MODELS.build(dict(type='VisionMambaDet', arch=TINY_ARCH, img_size=128, scan_recompute=flag))
        assert [b.mixer.scan_recompute for b in backbone.layers] == [flag] * len(backbone.layers)
