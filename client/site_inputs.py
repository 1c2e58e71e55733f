"""What a round at a site trains and scores on: whole images stacked once, or patches of cached cases.

The server's ``patch-size`` picks the path. Without it (the 2D benchmarks) a
site's cases are stacked into tensors once per process and batches are index
slices, the fastest loop there is. With it (3D volumes, or any data too large to
hold at once) cases come through :mod:`client.patch_pipeline`'s disk cache,
training draws random patches and evaluation slides a window over each case.
Both offer the same four things to the ClientApp, so a round does not care which.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from shared_models.protocol import RoundConfig, TrainSettings

from .data import load_site
from .patch_eval import evaluate_windows
from .patch_pipeline import PatchBatches, PatchSite, PipelineSpec, patch_site, statistics_patches
from .site_paths import SitePaths
from .trainer import BatchSource, EvalReport, TensorBatches, evaluate_dice, to_batch_tensors


@dataclass
class SiteTensors:
    """A site's train and test tensors, stacked once."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    test_spacing: tuple[tuple[float, ...], ...] = ()  # voxel size (mm) of each test case: HD95 in mm
    num_rejected: int = 0  # cases the site refused to read

    @property
    def num_train(self) -> int:
        return len(self.train_x)

    @property
    def num_test(self) -> int:
        return len(self.test_x)

    def batches(self, settings: TrainSettings) -> BatchSource:
        return TensorBatches(self.train_x, self.train_y, settings.batch_size, settings.seed)

    def statistics_images(self, seed: int) -> torch.Tensor:
        return self.train_x

    def evaluate(self, model: torch.nn.Module, cfg: RoundConfig) -> EvalReport:
        return evaluate_dice(model, self.test_x, self.test_y, self.num_classes, cfg.train.device, cfg.train.batch_size,
                             cfg.with_hd95, self.test_spacing)


@dataclass
class SitePatches:
    """A site's cases behind the disk cache: patches to train on, whole cases scored by a sliding window."""

    site: PatchSite

    @property
    def num_classes(self) -> int:
        return self.site.num_classes

    @property
    def num_train(self) -> int:
        return len(self.site.train)

    @property
    def num_test(self) -> int:
        return len(self.site.test)

    @property
    def num_rejected(self) -> int:
        return len(self.site.rejected)

    def batches(self, settings: TrainSettings) -> BatchSource:
        return PatchBatches(self.site, settings.batch_size, settings.seed, settings.loader_workers)

    def statistics_images(self, seed: int) -> torch.Tensor:
        return statistics_patches(self.site, seed)

    def evaluate(self, model: torch.nn.Module, cfg: RoundConfig) -> EvalReport:
        return evaluate_windows(model, self.site, self.site.test, cfg.train.device, cfg.with_hd95)


SiteInputs = SiteTensors | SitePatches


def stack_cases(cases) -> tuple[torch.Tensor, torch.Tensor]:
    if not cases:
        return torch.empty(0), torch.empty(0, dtype=torch.int64)
    return to_batch_tensors(np.stack([c.image for c in cases]), np.stack([c.label for c in cases]))


def _num_classes(cfg: RoundConfig) -> int | None:
    return int(cfg.model_spec.get("out_channels", cfg.model_spec.get("out-channels", 0))) or None


def site_tensors(paths: SitePaths, cfg: RoundConfig) -> SiteTensors:
    """Load the site's split (the pooled node: every site's train split, one shape)."""
    opts = dict(test_fraction=cfg.test_fraction, split_seed=cfg.split_seed, num_classes=_num_classes(cfg), intensity=cfg.intensity)
    if not paths.pooled_sites:
        data = load_site(paths.data_dir, **opts)
        return SiteTensors(*stack_cases(data.train), *stack_cases(data.test), data.num_classes, tuple(c.spacing for c in data.test),
                           num_rejected=data.n_rejected)
    per_site = [load_site(paths.data_dir / s, **opts) for s in paths.pooled_sites]
    shape = tuple(int(max(d.spatial_shape[i] for d in per_site)) for i in range(len(per_site[0].spatial_shape)))
    per_site = [load_site(paths.data_dir / s, spatial_shape=shape, **opts) for s in paths.pooled_sites]
    train = [c for d in per_site for c in d.train]
    return SiteTensors(*stack_cases(train), *stack_cases([]), per_site[0].num_classes)


def site_patches(paths: SitePaths, cfg: RoundConfig) -> SitePatches:
    """The site's cases through the patch pipeline (the pooled node: every site's training cases, no test)."""
    spec = PipelineSpec(cfg.train.patch_shape, cfg.intensity, cfg.train.target_spacing_mm)
    opts = dict(test_fraction=cfg.test_fraction, split_seed=cfg.split_seed, num_classes=_num_classes(cfg))
    if not paths.pooled_sites:
        return SitePatches(patch_site(paths.data_dir, spec, paths.state_dir, **opts))
    sites = [patch_site(paths.data_dir / s, spec, paths.state_dir, **opts) for s in paths.pooled_sites]
    offsets = np.cumsum([0] + [len(s.cases) for s in sites[:-1]])
    train = tuple(int(o) + i for o, s in zip(offsets, sites) for i in s.train)
    rejected = tuple(r for s in sites for r in s.rejected)
    return SitePatches(replace(sites[0], site="pooled", cases=ConcatDataset([s.cases for s in sites]), train=train, test=(),
                               rejected=rejected))


def site_inputs(paths: SitePaths, cfg: RoundConfig) -> SiteInputs:
    """The round's inputs at this site: patches when the server set a patch size, else whole images."""
    return site_patches(paths, cfg) if cfg.train.patch_size else site_tensors(paths, cfg)
