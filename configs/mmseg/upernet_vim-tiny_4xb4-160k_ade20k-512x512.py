# UperNet, Vim-Ti backbone, ADE20k 512², 160k iterations at batch 16 (4 GPUs x 4).
# The paper's recipe: features of blocks 5/11/17/23 -> a 4-scale pyramid (strides 4/8/16/32; mmseg's
# Feature2Pyramid) -> UperNet + auxiliary FCN head; AdamW with layer-wise lr decay 0.92, poly schedule with 1,500
# warm-up iterations; ImageNet-1k weights with pos_embed resampled to 512² around the middle class token.
# Paper number (Vim, ICML 2024, Table 2): 41.0 mIoU single-scale on ADE20k val (DeiT-Ti: 39.2).
_base_ = [
    'mmseg::_base_/models/upernet_mae.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]
custom_imports = dict(imports=['vim.mmseg'], allow_failed_imports=False)

crop_size = (512, 512)
embed_dim = 192
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        _delete_=True,
        type='VisionMambaSeg',
        arch='tiny',
        img_size=crop_size,
        patch_size=16,
        out_indices=(5, 11, 17, 23),
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='vim_tiny_patch16_224.in1k')),
    neck=dict(embed_dim=embed_dim, rescales=[4, 2, 1, 0.5]),
    decode_head=dict(in_channels=[embed_dim] * 4, channels=embed_dim, num_classes=150),
    auxiliary_head=dict(in_channels=embed_dim, num_classes=150),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='VimLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(decay_rate=0.92))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False),
]
train_dataloader = dict(batch_size=4)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
