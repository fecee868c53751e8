# Cascade Mask R-CNN, Vim-Ti backbone, ViTDet recipe (see mask-rcnn_vim-tiny_sfp_lsj-1024_coco.py for the rest).
# Paper number (Vim, ICML 2024, Table 3): 45.7 box AP / 39.2 mask AP on COCO val2017 (DeiT-Ti: 44.4 / 38.1).
_base_ = './mask-rcnn_vim-tiny_sfp_lsj-1024_coco.py'

norm_cfg = dict(type='LayerNorm2d', eps=1e-6)
roi_layer = dict(type='RoIAlign', sampling_ratio=0, use_torchvision=True)


def _bbox_head(stds):
    return dict(
        type='Shared4Conv1FCBBoxHead',
        in_channels=256,
        conv_out_channels=256,
        fc_out_channels=1024,
        roi_feat_size=7,
        num_classes=80,
        norm_cfg=norm_cfg,
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0., 0., 0., 0.], target_stds=stds),
        reg_class_agnostic=True,
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
        loss_bbox=dict(type='SmoothL1Loss', beta=1.0, loss_weight=1.0))


def _rcnn_stage(iou):
    return dict(
        assigner=dict(type='MaxIoUAssigner', pos_iou_thr=iou, neg_iou_thr=iou, min_pos_iou=iou,
                      match_low_quality=False, ignore_iof_thr=-1),
        sampler=dict(type='RandomSampler', num=512, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True),
        mask_size=28,
        pos_weight=-1,
        debug=False)


model = dict(
    type='CascadeRCNN',  # mmdet's cascade detector (the base is a MaskRCNN); same pieces, cascade RoI head
    roi_head=dict(
        _delete_=True,
        type='CascadeRoIHead',
        num_stages=3,
        stage_loss_weights=[1, 0.5, 0.25],
        bbox_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(roi_layer, output_size=7),
            out_channels=256,
            featmap_strides=[4, 8, 16, 32]),
        bbox_head=[
            _bbox_head([0.1, 0.1, 0.2, 0.2]),
            _bbox_head([0.05, 0.05, 0.1, 0.1]),
            _bbox_head([0.033, 0.033, 0.067, 0.067]),
        ],
        mask_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(roi_layer, output_size=14),
            out_channels=256,
            featmap_strides=[4, 8, 16, 32]),
        mask_head=dict(
            type='FCNMaskHead',
            num_convs=4,
            in_channels=256,
            conv_out_channels=256,
            num_classes=80,
            norm_cfg=norm_cfg,
            loss_mask=dict(type='CrossEntropyLoss', use_mask=True, loss_weight=1.0))),
    train_cfg=dict(rcnn=[_rcnn_stage(0.5), _rcnn_stage(0.6), _rcnn_stage(0.7)]))
