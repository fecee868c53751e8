# UperNet, Vim-Ti+ (patch 16, stride 8: the "finer granularity" ImageNet model, 78.3 top-1), ADE20k 512², 160k.
# The token grid is 64x64 at 512² (inputs padded by 4 px per side so it aligns with stride 8), so the pyramid is
# built with rescales 2, 1, 0.5, 0.25 for the same strides 4/8/16/32. Recipe otherwise as
# upernet_vim-tiny_4xb4-160k_ade20k-512x512.py. Paper number: none reported for stride-8 models on ADE20k.
_base_ = './upernet_vim-tiny_4xb4-160k_ade20k-512x512.py'

model = dict(
    backbone=dict(stride=8, with_cp=True, init_cfg=dict(checkpoint='vim_tiny_patch16_stride8_224.in1k')),
    neck=dict(rescales=[2, 1, 0.5, 0.25]))
