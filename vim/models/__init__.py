from .checkpoint import (
    CheckpointError,
    load_checkpoint_file,
    official_to_vim,
    resample_pos_embed,
    vim_to_official,
)
from .vision_mamba import VisionMamba, checkpoint_filter_fn

__all__ = [
    'VisionMamba', 'checkpoint_filter_fn', 'CheckpointError', 'load_checkpoint_file', 'official_to_vim',
    'vim_to_official', 'resample_pos_embed',
]
