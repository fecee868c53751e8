"""Vision Mamba backbones. Importing ``vim`` registers the models with timm."""
from . import models
from .models import VisionMamba

__version__ = '0.1.0'
__all__ = ['VisionMamba', 'models', '__version__']
