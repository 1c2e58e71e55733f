"""A site's cases as a MONAI pipeline: an on-disk cache, random patches for training.

Whole-image training stacks every case in memory, padded to the largest one; a
hospital's 3D volumes do not fit that. Here each case is read once through the
checked reader of :mod:`client.case_read` (channel-first, RAS, the plan's voxel
size, z-score per modality), kept on the site's disk by MONAI's
``PersistentDataset`` under a key that includes every file's size and mtime (an
edited file is read again), and training draws ``RandCropByPosNegLabeld``
patches through a ``DataLoader``. Memory is bounded by the loader (batch x
patch), not by the number of cases. A case the reader refuses is rejected by
name, as :func:`client.data.load_site` does, and the site goes on without it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.data import DataLoader, Dataset, PersistentDataset
from monai.transforms import Compose, RandCropByPosNegLabeld, SpatialPadd, Transform
from torch.utils.data import Subset

from .case_files import CaseFiles, DataError, Rejected, discover_site
from .case_read import read_case_files
from .data import Intensity, cached_for_site, split_cases

CACHE_DIR = "case-cache"
PATCHES_PER_CASE = 2  # patches drawn from one case per epoch: one centred on foreground, one anywhere
ORIENTATION = "RAS"
log = logging.getLogger("fedsite.patches")


@dataclass(frozen=True)
class PipelineSpec:
    """How a site's cases become network inputs: grid, intensity and patch size."""

    patch: tuple[int, ...]
    intensity: Intensity = "zscore"
    spacing: tuple[float, ...] = ()  # () keeps each case's own voxel size
    orientation: str = ORIENTATION

    @property
    def spatial_dims(self) -> int:
        return len(self.patch)

    def tag(self) -> str:
        """Names the cache folder: cases read under another grid or intensity never mix."""
        text = f"{self.intensity}|{self.orientation}|{','.join(f'{v:g}' for v in self.spacing)}|{self.spatial_dims}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


class ReadCased(Transform):
    """``{"images": [paths], "label": path, "name": ...}`` -> the checked case as tensors (cached on disk)."""

    def __init__(self, spec: PipelineSpec):
        self.spec = spec

    def __call__(self, item: dict) -> dict:
        files = CaseFiles(item["name"], tuple(Path(p) for p in item["images"]), Path(item["label"]))
        spacing = self.spec.spacing or None
        case = read_case_files(files, self.spec.spatial_dims, self.spec.intensity, self.spec.orientation, spacing)
        return {"name": case.name, "image": torch.from_numpy(case.image), "label": torch.from_numpy(case.label),
                "spacing": torch.tensor(case.spacing, dtype=torch.float64)}


def _item(files: CaseFiles) -> dict:
    stamp = [(p.stat().st_size, p.stat().st_mtime_ns) for p in (*files.images, files.label)]
    return {"name": files.name, "images": [str(p) for p in files.images], "label": str(files.label), "stamp": str(stamp)}


def _reason(files: dict, exc: Exception) -> str:
    """The reader's own one line (a DataError naming the file), however deep MONAI wrapped it."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, DataError):
        cause = cause.__cause__
    return str(cause) if cause is not None else f"{files['images'][0]}: unreadable case ({type(exc).__name__}: {exc})"


@dataclass(frozen=True)
class PatchSite:
    """A site's usable cases behind the disk cache, split into train/test; the rejected ones named."""

    site: str
    spec: PipelineSpec
    cases: PersistentDataset
    train: tuple[int, ...]  # indices into ``cases``
    test: tuple[int, ...]
    num_classes: int
    in_channels: int
    rejected: tuple[Rejected, ...]


def _check_cases(cases: PersistentDataset, items: list[dict], num_classes: int | None) -> tuple[list[int], list[Rejected], int]:
    """Read (and cache) every case once; reject the unreadable ones and labels outside ``num_classes``."""
    usable, rejected, top = [], [], 1
    for index, item in enumerate(items):
        try:
            label_max = int(cases[index]["label"].max())
        except Exception as exc:  # noqa: BLE001 -- any reader failure rejects this case only
            rejected.append(Rejected(item["name"], _reason(item, exc)))
            continue
        if num_classes is not None and label_max >= num_classes:
            rejected.append(Rejected(item["name"], f"{item['label']}: label value {label_max} >= num_classes={num_classes}"))
            continue
        usable.append(index)
        top = max(top, label_max)
    return usable, rejected, num_classes or top + 1


def patch_site(
    site_dir: str | Path, spec: PipelineSpec, cache_root: str | Path, *, test_fraction: float = 0.25, split_seed: int = 0,
    num_classes: int | None = None,
) -> PatchSite:
    """The site's cases under ``cache_root/case-cache/<spec>``; memoised per process while its files are unchanged."""
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise DataError(f"{site_dir}: site folder does not exist")
    cache = Path(cache_root) / CACHE_DIR / spec.tag()
    key = ("patches", str(site_dir.resolve()), spec, str(cache), float(test_fraction), int(split_seed), num_classes)
    return cached_for_site(site_dir, key, lambda: _build_site(site_dir, spec, cache, test_fraction, split_seed, num_classes))


def _build_site(site_dir: Path, spec: PipelineSpec, cache: Path, test_fraction: float, split_seed: int,
                num_classes: int | None) -> PatchSite:
    found = discover_site(site_dir)
    if found.cases and found.spatial_dims != spec.spatial_dims:
        raise DataError(f"site {site_dir.name}: cases are {found.spatial_dims}D but the patch size {spec.patch} is "
                        f"{spec.spatial_dims}D")
    items = [_item(f) for f in found.cases]
    cache.mkdir(parents=True, exist_ok=True)
    cases = PersistentDataset(items, transform=ReadCased(spec), cache_dir=cache)
    usable, rejected, classes = _check_cases(cases, items, num_classes)
    rejected = sorted([*found.rejected, *rejected], key=lambda r: r.case)
    for r in rejected:
        log.warning("site %s: rejected case %s: %s", site_dir.name, r.case, r.reason)
    if not usable:
        first = f"; first: {rejected[0].reason}" if rejected else ""
        raise DataError(f"site {site_dir.name} ({site_dir}): no valid case ({len(rejected)} rejected{first})")
    names = {items[i]["name"]: i for i in usable}
    train, test = split_cases(list(names), test_fraction, split_seed)
    return PatchSite(site_dir.resolve().name, spec, cases, tuple(names[n] for n in train), tuple(names[n] for n in test),
                     classes, found.in_channels, tuple(rejected))


def patch_transform(spec: PipelineSpec, seed: int) -> Compose:
    """Pad a case to at least one patch, then draw :data:`PATCHES_PER_CASE` patches (half on foreground)."""
    keys = ("image", "label")
    chain = Compose([
        SpatialPadd(keys, spatial_size=spec.patch),
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=spec.patch, pos=1, neg=1,
                               num_samples=PATCHES_PER_CASE, allow_smaller=False),
    ])
    chain.set_random_state(seed=seed % 2**32)
    return chain


class PatchBatches:
    """Training batches of random patches of the site's training cases (a :class:`client.trainer.BatchSource`)."""

    def __init__(self, site: PatchSite, batch_size: int, seed: int, workers: int = 0, indices: Sequence[int] | None = None):
        chosen = list(site.train if indices is None else indices)
        per_batch = max(1, batch_size // PATCHES_PER_CASE)  # cases per batch: batch_size counts patches
        data = Dataset(Subset(site.cases, chosen), transform=patch_transform(site.spec, seed))
        self.loader = DataLoader(data, batch_size=per_batch, shuffle=True, num_workers=workers,
                                 generator=torch.Generator().manual_seed(seed), persistent_workers=False)
        self.spatial_dims = site.spec.spatial_dims
        self.steps_per_epoch = len(self.loader)

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            yield _plain(batch["image"]).float(), _plain(batch["label"]).long()


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A MetaTensor's data as a plain tensor: the loss and the norms never need its metadata."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor


def statistics_patches(site: PatchSite, seed: int, limit: int = 64) -> torch.Tensor:
    """Up to ``limit`` training patches, un-augmented, for re-estimating norm statistics."""
    patches, source = [], PatchBatches(site, 2 * PATCHES_PER_CASE, seed)
    for x, _ in source.epoch():
        patches.append(x)
        if sum(len(p) for p in patches) >= limit:
            break
    return torch.cat(patches)[:limit]
