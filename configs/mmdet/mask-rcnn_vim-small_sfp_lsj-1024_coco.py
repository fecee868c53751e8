# Mask R-CNN, Vim-S backbone, ViTDet recipe (see mask-rcnn_vim-tiny_sfp_lsj-1024_coco.py).
# Paper number: none (the paper reports COCO only for Vim-Ti, Cascade Mask R-CNN: 45.7 box / 39.2 mask AP).
_base_ = './mask-rcnn_vim-tiny_sfp_lsj-1024_coco.py'

embed_dim = 384
model = dict(
    backbone=dict(
        arch='small', drop_path_rate=0.2, init_cfg=dict(checkpoint='vim_small_patch16_224.in1k')),
    neck=dict(in_channels=embed_dim))
