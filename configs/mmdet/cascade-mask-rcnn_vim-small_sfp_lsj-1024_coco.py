# Cascade Mask R-CNN, Vim-S backbone, ViTDet recipe (see cascade-mask-rcnn_vim-tiny_sfp_lsj-1024_coco.py).
# Paper number: none reported for Vim-S (Vim-Ti: 45.7 box / 39.2 mask AP); the DeiT-S analogue is the reference.
_base_ = './cascade-mask-rcnn_vim-tiny_sfp_lsj-1024_coco.py'

embed_dim = 384
model = dict(
    backbone=dict(
        arch='small', drop_path_rate=0.2, init_cfg=dict(checkpoint='vim_small_patch16_224.in1k')),
    neck=dict(in_channels=embed_dim))
