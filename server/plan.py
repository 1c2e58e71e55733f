"""A training plan from the sites' fingerprints (nnU-Net's idea, for a federation).

nnU-Net derives its network and training settings from a dataset fingerprint
instead of fixed defaults. Here the fingerprints are the sites' own summaries
(:class:`shared_models.protocol.SiteFingerprint`) and the plan is one for the
whole federation: every site trains the same network, so the sites must agree on
the dimensionality and their label maps must fit one class list.

Rules (a pure function of the fingerprints):

- patch shape: the per-axis median of the sites' median case shapes, capped at
  ``MAX_PATCH`` per axis and rounded down to a multiple of the network's stride;
- patches or whole images: 3D volumes always train on random patches of the patch
  shape, resampled to the median voxel size (they rarely fit in memory whole); 2D
  slices train whole, stacked once, unless a median side exceeds ``MAX_PATCH``;
- depth: halve while the bottleneck's smallest side stays >= ``MIN_BOTTLENECK``
  pixels (nnU-Net's minimum feature-map size), between 2 and 5 downsamplings;
- widths ``16 * 2**level`` capped at 256, the widest lowered to fit ``max_width``;
- batch 8 in 2D, 2 in 3D, never above the smallest training site's cases;
- Adam at lr 1e-2, which the poly schedule decays to 0 over the federation's local
  steps, and BatchNorm (the norm FedBN/SiloBN keep local). A federation of small
  sites trains a few hundred steps per site; Adam's usual 1e-3 stops far short of
  convergence there (local Dice 0.674 vs 0.732 at 1e-2 on 4 sites of 30 training
  slices of 91x109, 40 rounds). The pooled arm's single trainer takes every site's
  data each epoch, as many steps as all sites together, and keeps Adam's 1e-3
  there (pooled Dice 0.763 vs 0.683 at 1e-2 on the same folder);
- classes: the union of the sites' label values (outputs: the largest + 1).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from shared_models.protocol import SiteFingerprint

MODEL = "unet"
NORM = "batch"
OPTIMIZER = "adam"
LR = 1e-2
POOLED_LR = 1e-3
BASE_WIDTH = 16
MAX_WIDTH = 256
MIN_BOTTLENECK = 8  # px: the smallest side of the deepest feature map
MIN_DOWNSAMPLINGS, MAX_DOWNSAMPLINGS = 2, 5
BATCH_SIZE = {2: 8, 3: 2}
MAX_PATCH = {2: 512, 3: 96}  # voxels per axis; 96^3 keeps a batch of 2 within a CPU's or a small GPU's memory


class PlanError(ValueError):
    """The sites' fingerprints cannot share one plan (the message names the site)."""


@dataclass(frozen=True)
class Plan:
    """What the federation trains, derived from the fingerprints; ``reasons`` says why per value."""

    sites: tuple[str, ...]
    spatial_dims: int
    patch_shape: tuple[int, ...]
    spacing: tuple[float, ...]
    classes: tuple[int, ...]
    num_classes: int
    downsamplings: int
    bottleneck: tuple[int, ...]
    model: str
    channels: tuple[int, ...]
    norm: str
    optimizer: str
    lr: float
    pooled_lr: float
    batch_size: int
    reasons: dict[str, str]
    patch_size: tuple[int, ...] = ()  # () = whole images; else train on random patches, score with a sliding window
    target_spacing: tuple[float, ...] = ()  # with patches: every case resampled to this voxel size (mm)

    @property
    def model_spec(self) -> dict[str, Any]:
        """The planned model as an experiment's ``model`` mapping."""
        return {"name": self.model, "channels": list(self.channels), "norm": self.norm}

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "model_spec": self.model_spec}


def _check_dims(fingerprints: Sequence[SiteFingerprint]) -> int:
    """The sites' common dimensionality; the first site that differs from the majority is named."""
    counts = Counter(fp.spatial_dims for fp in fingerprints)
    majority = max(counts, key=lambda d: (counts[d], -[fp.spatial_dims for fp in fingerprints].index(d)))
    for fp in fingerprints:
        if fp.spatial_dims != majority:
            raise PlanError(f"site {fp.site_id}: {fp.spatial_dims}D images, the other sites' are {majority}D")
    return majority


def _check_classes(fingerprints: Sequence[SiteFingerprint]) -> tuple[int, ...]:
    """Union of the sites' label values. A value past a gap (no site has the values between)
    that only some sites have means their label maps disagree: the first such site is named."""
    union = sorted({c for fp in fingerprints for c in fp.classes} | {0})
    if union[-1] < 1:
        raise PlanError("no site has a foreground class in its labels")
    missing = sorted(set(range(union[-1] + 1)) - set(union))
    if missing:
        holders = [fp for fp in fingerprints if max(fp.classes) > missing[0]]
        if len(holders) < len(fingerprints):
            extra = [c for c in holders[0].classes if c > missing[0]]
            raise PlanError(f"site {holders[0].site_id}: label values {extra} but {missing} appear at no site: "
                            "the sites' label maps disagree")
    return tuple(union)


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def patch_for(median: Sequence[int], dims: int) -> tuple[tuple[int, ...], int, bool]:
    """(patch shape, downsamplings, train on patches?) from the median case shape."""
    capped = tuple(min(int(v), MAX_PATCH[dims]) for v in median)
    levels = downsamplings_for(capped)
    stride = 2**levels
    patched = dims == 3 or capped != tuple(int(v) for v in median)
    if not patched:
        return capped, levels, False
    return tuple(max(stride, v // stride * stride) for v in capped), levels, True


def downsamplings_for(patch_shape: Sequence[int]) -> int:
    """2x downsamplings until the bottleneck's smallest side would drop below ``MIN_BOTTLENECK``."""
    smallest, levels = min(patch_shape), 0
    while levels < MAX_DOWNSAMPLINGS and smallest / 2 ** (levels + 1) >= MIN_BOTTLENECK:
        levels += 1
    return max(levels, MIN_DOWNSAMPLINGS)


def widths_for(downsamplings: int, max_width: int = MAX_WIDTH) -> tuple[int, ...]:
    """``BASE_WIDTH * 2**level`` for every level (the first plus one per downsampling), capped."""
    return tuple(min(BASE_WIDTH * 2**level, max_width, MAX_WIDTH) for level in range(downsamplings + 1))


def make_plan(
    fingerprints: Sequence[SiteFingerprint], training_sites: Collection[str] | None = None, max_width: int = MAX_WIDTH
) -> Plan:
    """The federation's plan. ``training_sites`` (default: all) cap the batch size; ``max_width`` caps the widths."""
    if not fingerprints:
        raise PlanError("no site fingerprints to plan from")
    dims = _check_dims(fingerprints)
    classes = _check_classes(fingerprints)
    median = tuple(int(round(_median([fp.shape_median[a] for fp in fingerprints]))) for a in range(dims))
    spacing = tuple(_median([fp.spacing[a] for fp in fingerprints]) for a in range(dims))
    patch, levels, patched = patch_for(median, dims)
    channels = widths_for(levels, max_width)
    trainers = [fp for fp in fingerprints if training_sites is None or fp.site_id in training_sites] or list(fingerprints)
    smallest = min(trainers, key=lambda fp: fp.num_train)
    batch = max(1, min(BATCH_SIZE[dims], smallest.num_train))
    reasons = {
        "patch_shape": f"median case shape over {len(fingerprints)} sites"
                       + (f", at most {MAX_PATCH[dims]} per axis, a multiple of {2**levels}" if patched else ""),
        "patch_size": ("random patches (3D)" if dims == 3 else f"random patches (a side over {MAX_PATCH[dims]})")
                      + ", resampled to the median spacing" if patched else "whole images",
        "channels": f"{levels} downsamplings: bottleneck {'x'.join(str(s // 2**levels) for s in patch)} px "
                    f"(smallest side >= {MIN_BOTTLENECK}, {MIN_DOWNSAMPLINGS}..{MAX_DOWNSAMPLINGS} downsamplings)"
                    + (f", widths capped at {max_width}" if max_width < MAX_WIDTH else ""),
        "batch_size": f"{BATCH_SIZE[dims]} in {dims}D" + (f", capped by {smallest.site_id}'s {smallest.num_train} training cases"
                                                          if batch < BATCH_SIZE[dims] else ""),
        "lr": f"{OPTIMIZER}, decayed to 0 over the federation's local steps; the pooled trainer, with every site's "
              f"steps, {POOLED_LR:g}",
        "classes": "union of the sites' label values",
    }
    return Plan(
        sites=tuple(fp.site_id for fp in fingerprints), spatial_dims=dims, patch_shape=patch, spacing=spacing,
        classes=classes, num_classes=classes[-1] + 1, downsamplings=levels,
        bottleneck=tuple(s // 2**levels for s in patch), model=MODEL, channels=channels, norm=NORM,
        optimizer=OPTIMIZER, lr=LR, pooled_lr=POOLED_LR, batch_size=batch, reasons=reasons,
        patch_size=patch if patched else (), target_spacing=spacing if patched else (),
    )

