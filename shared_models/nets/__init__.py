"""Segmentation networks; importing this package registers every model."""

from . import monai_nets, unet  # noqa: F401  (registration side effects)
from . import dualnorm_unet  # noqa: F401  (registration side effects)
from . import segnetr, uxnet  # noqa: F401  (registration side effects)
from .registry import MODELS, ModelRegistryError, model_names, register_model

__all__ = ["MODELS", "ModelRegistryError", "model_names", "register_model"]
