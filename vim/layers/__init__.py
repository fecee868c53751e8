from .block import Block
from .mixer import BidirectionalMamba
from .patch_embed import PatchEmbed

__all__ = ['Block', 'BidirectionalMamba', 'PatchEmbed']
