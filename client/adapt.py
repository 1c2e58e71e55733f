"""A site that never trained: how it builds its norm tensors from a finished federation.

What a hospital joining late runs on its own images (labels are never needed):

* ``average_tensors``: the element-wise mean of the training sites' local tensors
  (integer buffers such as ``num_batches_tracked``: the mean, rounded);
* ``adabn``: the running statistics of every BatchNorm-type layer (``nn.BatchNorm*``,
  incl. DualNorm's inner BN; BIN; InstanceNorm with tracked stats) re-estimated on
  the site's images (Li et al., AdaBN): stats reset, ``momentum=None`` (cumulative
  average over batches), forward passes of the whole model in train mode under
  ``no_grad``, images in their sorted order split into near-equal batches of at most
  ``batch_size``. Only tensors whose partition role is STATISTIC of those layers
  change; everything else (Switchable Norm's buffers, which train mode would move,
  included) is restored;
* ``sn_batch_average``: every Switchable Norm layer's BN-branch statistics replaced
  by the batch average over the images (:func:`shared_models.norms.switchable.recompute_sn_bn_stats`);
* ``load_new_site``: the site's images (all of them, for adaptation) and its labelled
  subset (for scoring only).

A site that did train uses the same two re-estimations before it is scored
(:mod:`client.refresh`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import NormalizeIntensity, ResizeWithPadOrCrop
from monai.utils import convert_to_numpy
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from shared_models.norms.bin import BatchInstanceNorm
from shared_models.norms.registry import TensorRole
from shared_models.norms.switchable import SwitchNorm, recompute_sn_bn_stats
from shared_models.partition import tensor_roles

from .data import DataError, read_case, read_image, scan_folder
from .trainer import resolve_device, to_batch_tensors


def average_tensors(per_site: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean over sites, computed in float64; integer tensors rounded back to their dtype."""
    if not per_site:
        return {}
    out = {}
    for key in per_site[0]:
        stack = torch.stack([site[key].detach().cpu().to(torch.float64) for site in per_site])
        mean = stack.mean(dim=0)
        dtype = per_site[0][key].dtype
        out[key] = (mean.round() if not (dtype.is_floating_point or dtype.is_complex) else mean).to(dtype)
    return out


def adabn_layers(model: nn.Module) -> dict[str, nn.Module]:
    """BatchNorm-type layers with running statistics, by module name (Switchable Norm excluded)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, SwitchNorm):
            continue
        if isinstance(module, (_BatchNorm, _InstanceNorm)) and module.track_running_stats and module.running_mean is not None:
            layers[name] = module
        elif isinstance(module, BatchInstanceNorm):
            layers[name] = module
    return layers


def _batches(images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Images in order, in ceil(N / batch_size) near-equal batches (sizes differ by at most one)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(images) == 0:
        raise ValueError("no images to adapt on")
    return list(torch.tensor_split(images, math.ceil(len(images) / batch_size)))


def _reset(module: nn.Module) -> None:
    if hasattr(module, "reset_running_stats"):
        module.reset_running_stats()
        return
    module.running_mean.zero_()
    module.running_var.fill_(1.0)
    if getattr(module, "num_batches_tracked", None) is not None:
        module.num_batches_tracked.zero_()


@torch.no_grad()
def adabn(model: nn.Module, images: torch.Tensor, batch_size: int = 8, device: str = "cpu") -> list[str]:
    """Re-estimate BN-type running statistics on ``images`` in place; returns the keys allowed to change."""
    roles = tensor_roles(model)
    layers = adabn_layers(model)
    allowed = sorted(
        key
        for key, role in roles.items()
        if role == TensorRole.STATISTIC and key.rsplit(".", 1)[0] in layers
    )
    if not layers:
        return []
    dev = resolve_device(device)
    model.to(dev)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modes = {m: m.training for m in model.modules()}
    momenta = {name: m.momentum for name, m in layers.items()}
    try:
        for m in layers.values():
            _reset(m)
            m.momentum = None  # cumulative average: every batch weighs the same
        model.train()
        for k, batch in enumerate(_batches(images, batch_size), 1):
            for m in layers.values():
                if isinstance(m, _InstanceNorm):  # F.instance_norm ignores momentum=None: give it 1/k
                    m.momentum = 1.0 / k
            model(batch.to(dev))
    finally:
        for name, m in layers.items():
            m.momentum = momenta[name]
        for module, training in modes.items():
            module.training = training
    keep = set(allowed)
    state = model.state_dict()
    for key, value in before.items():  # train mode may have moved other buffers (e.g. Switchable Norm's): undo
        if key not in keep:
            state[key].copy_(value)
    return allowed


def sn_batch_average(model: nn.Module, images: torch.Tensor, batch_size: int = 8, mode: str = "mean", device: str = "cpu") -> int:
    """Switchable Norm's BN-branch statistics as the batch average over ``images``; returns the layers changed."""
    layers = [m for m in model.modules() if isinstance(m, SwitchNorm) and m.using_bn]
    if not layers:
        return 0
    model.to(resolve_device(device))
    batches = _batches(images, batch_size)
    recompute_sn_bn_stats(model, batches, num_batches=len(batches), mode=mode)
    return len(layers)


# ---------------------------------------------------------------- the new site's images


@dataclass
class NewSite:
    """All images of the new site (adaptation) and its labelled subset (scoring)."""

    root: Path
    names: tuple[str, ...]
    images: torch.Tensor  # (N, 1, *S)
    labelled: tuple[str, ...]
    label_images: torch.Tensor  # (M, 1, *S), M <= N
    labels: torch.Tensor  # (M, 1, *S)


def load_new_site(site_dir: str | Path, *, intensity: str = "zscore", spatial_shape: Sequence[int] | None = None) -> NewSite:
    """``SITE/images/*.nii.gz`` (required) and whichever ``SITE/labels/*.nii.gz`` exist."""
    site_dir = Path(site_dir)
    images_dir, labels_dir = site_dir / "images", site_dir / "labels"
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: missing folder (the new site needs images/; labels/ is optional)")
    if intensity not in ("zscore", "none"):
        raise ValueError(f"intensity must be 'zscore' or 'none', got {intensity!r}")
    images = scan_folder(images_dir)
    labels = scan_folder(labels_dir) if labels_dir.is_dir() else {}
    if not images:
        raise DataError(f"{images_dir}: no .nii/.nii.gz images")
    for name, path in labels.items():
        if name not in images:
            raise DataError(f"{path}: label without an image in {images_dir}")
    arrays: dict[str, np.ndarray] = {}
    label_arrays: dict[str, np.ndarray] = {}
    for name, path in sorted(images.items()):
        if name in labels:
            case = read_case(name, path, labels[name], intensity)  # checks the pair, z-scores
            arrays[name], label_arrays[name] = case.image, case.label
        else:
            image = read_image(path, "image")
            if not np.isfinite(image).all():
                raise DataError(f"{path}: image contains NaN/Inf")
            arrays[name] = convert_to_numpy(NormalizeIntensity()(image), dtype=np.float32) if intensity == "zscore" else image
    dims = {a.ndim - 1 for a in arrays.values()}
    if len(dims) > 1:
        raise DataError(f"{site_dir}: mixes 2D and 3D images")
    (ndim,) = dims
    shape = tuple(int(s) for s in spatial_shape) if spatial_shape else tuple(max(a.shape[1 + d] for a in arrays.values()) for d in range(ndim))
    resize = ResizeWithPadOrCrop(shape)

    def fit(a: np.ndarray, dtype) -> np.ndarray:
        return a if a.shape[1:] == shape else convert_to_numpy(resize(a), dtype=dtype)

    names = tuple(sorted(arrays))
    labelled = tuple(n for n in names if n in label_arrays)
    x = np.stack([fit(arrays[n], np.float32) for n in names])
    if labelled:
        lx, ly = to_batch_tensors(np.stack([fit(arrays[n], np.float32) for n in labelled]),
                                  np.stack([fit(label_arrays[n], np.int64) for n in labelled]))
    else:
        lx, ly = torch.zeros((0, 1, *shape)), torch.zeros((0, 1, *shape), dtype=torch.int64)
    return NewSite(site_dir, names, torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), labelled, lx, ly)


