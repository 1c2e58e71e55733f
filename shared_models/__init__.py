"""What the server and the sites must agree on: norms, networks, partition, losses."""

from .build import architecture_fingerprint, build_model, normalize_spec
from .partition import Policy, Split, partition

__all__ = ["Policy", "Split", "architecture_fingerprint", "build_model", "normalize_spec", "partition"]
