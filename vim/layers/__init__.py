from .block import Block
from .mixer import BidirectionalMamba, uses_scan
from .patch_embed import PatchEmbed

__all__ = ['Block', 'BidirectionalMamba', 'PatchEmbed', 'uses_scan']
