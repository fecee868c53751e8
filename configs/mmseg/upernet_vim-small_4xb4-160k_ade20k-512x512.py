# UperNet, Vim-S backbone, ADE20k 512², 160k iterations (recipe: upernet_vim-tiny_4xb4-160k_ade20k-512x512.py).
# Paper number (Vim, ICML 2024, Table 2): 44.9 mIoU single-scale on ADE20k val (DeiT-S: 44.0).
_base_ = './upernet_vim-tiny_4xb4-160k_ade20k-512x512.py'

embed_dim = 384
model = dict(
    backbone=dict(arch='small', drop_path_rate=0.2, init_cfg=dict(checkpoint='vim_small_patch16_224.in1k')),
    neck=dict(embed_dim=embed_dim),
    decode_head=dict(in_channels=[embed_dim] * 4, channels=embed_dim),
    auxiliary_head=dict(in_channels=embed_dim))
