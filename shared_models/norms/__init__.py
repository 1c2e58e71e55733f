"""Normalization layers and their registry.

Importing this package registers every norm; add a new norm as one module here
and one import line below.
"""

from . import batch, group, instance, layer  # noqa: F401  (registration side effects)
from . import bin, dualnorm, iln, switchable  # noqa: F401  (registration side effects)
from .registry import (
    NORM_TYPES,
    NORMS,
    NormRegistryError,
    TensorRole,
    build_norm,
    norm_names,
    norm_type_of,
    register_norm,
    register_norm_type,
)

__all__ = [
    "NORMS",
    "NORM_TYPES",
    "NormRegistryError",
    "TensorRole",
    "build_norm",
    "norm_names",
    "norm_type_of",
    "register_norm",
    "register_norm_type",
]
