# Mask R-CNN, Vim-Ti backbone, ViTDet recipe: the last block as a stride-16 map -> simple feature pyramid (scales
# 4, 2, 1, 0.5 + max-pool level, 256 channels, LayerNorm), large-scale jitter at 1024², AdamW with layer-wise lr
# decay, 184,375 iterations at batch 64 (16 GPUs x 4; "100 epochs"), ImageNet-1k weights resampled to 1024².
# Paper number: none (the paper reports COCO only for Cascade Mask R-CNN, see cascade-mask-rcnn_vim-tiny_*);
# the ViTDet analogue, DeiT-Ti-sized, is ~1 AP below its cascade counterpart.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::common/lsj-100e_coco-instance.py',
]
custom_imports = dict(imports=['vim.mmdet'], allow_failed_imports=False)

image_size = (1024, 1024)
embed_dim = 192
norm_cfg = dict(type='LayerNorm2d', eps=1e-6)
# torchvision's RoIAlign (same avg/aligned semantics as mmcv's) runs under bf16 autocast; mmcv's kernel has no bf16.
roi_layer = dict(type='RoIAlign', sampling_ratio=0, use_torchvision=True)

model = dict(
    data_preprocessor=dict(
        pad_size_divisor=32,
        batch_augments=[dict(type='BatchFixedSizePad', size=image_size, pad_mask=True)]),
    backbone=dict(
        _delete_=True,
        type='VisionMambaDet',
        arch='tiny',
        img_size=image_size,
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='vim_tiny_patch16_224.in1k')),
    neck=dict(
        _delete_=True,
        type='SimpleFeaturePyramid',
        in_channels=embed_dim,
        out_channels=256,
        scale_factors=(4.0, 2.0, 1.0, 0.5),
        num_outs=5,
        norm_cfg=norm_cfg),
    rpn_head=dict(num_convs=2),
    roi_head=dict(
        bbox_roi_extractor=dict(roi_layer=dict(roi_layer, output_size=7)),
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead',
            conv_out_channels=256,
            norm_cfg=norm_cfg),
        mask_roi_extractor=dict(roi_layer=dict(roi_layer, output_size=14)),
        mask_head=dict(norm_cfg=norm_cfg)))

# Test at the training scale (long side 1024, aspect kept: inputs need not be square).
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(batch_size=4, num_workers=8, sampler=dict(type='InfiniteSampler', shuffle=True))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1),
    constructor='VimLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(decay_rate=0.8))  # ViTDet's rate for 24-block backbones

max_iters = 184375
interval = 5000
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=interval)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=250),
    dict(type='MultiStepLR', begin=0, end=max_iters, by_epoch=False, milestones=[163889, 177546], gamma=0.1),
]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=interval, max_keep_ckpts=2, save_last=True))
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=False)
auto_scale_lr = dict(base_batch_size=64, enable=False)
