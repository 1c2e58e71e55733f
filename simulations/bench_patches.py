"""``fedsite bench --3d``: the site's patch pipeline against a plain MONAI loop, and its memory as cases grow.

1. Throughput: patches/s of one site's training (``client.patch_pipeline`` +
   ``client.trainer.train_batches``: disk cache, ``RandCropByPosNegLabeld``,
   DataLoader) against the loop a MONAI user writes by hand -- ``CacheDataset``
   with the same load/orientation/normalisation/crop transforms, the same network,
   Adam, the same batch -- interleaved repetitions, median of each, ratio ours/plain.
2. Memory: peak resident memory of a fresh process that builds the site and runs
   one training epoch, at ``--cases`` and at 10x as many volumes. With the disk
   cache the two should be close (only a batch of patches is ever held); the
   whole-image path (every case stacked in memory) is measured beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from shared_models.durable import atomic_write_text

PATCH = (32, 32, 32)
CHANNELS = (8, 16, 32)


def _dataset(out: Path, cases: int, size: int) -> Path:
    from .domain_shift import DEFAULT_PROFILES, generate_dataset

    return generate_dataset(out / f"data-{cases}", profiles=DEFAULT_PROFILES[:1], cases_per_site=cases, spatial_dims=3,
                            size=(size, size, size * 3 // 4)) / DEFAULT_PROFILES[0].name


def _model():
    from shared_models import build_model

    return build_model({"name": "unet", "spatial_dims": 3, "in_channels": 1, "out_channels": 4, "channels": list(CHANNELS)}, seed=0)


def _settings(batch_size: int):
    from client.trainer import TrainSettings

    return TrainSettings(epochs=1, lr=1e-3, batch_size=batch_size, device="cpu", augment=False, persist_optimizer=False,
                         schedule="constant", patch_size=",".join(map(str, PATCH)))


def ours(site_dir: Path, cache: Path, batch_size: int, seed: int) -> float:
    """Patches/s of one epoch of the ClientApp's patch training (cache already warm)."""
    from client.patch_pipeline import PatchBatches, PipelineSpec, patch_site
    from client.trainer import train_batches
    from shared_models.losses import segmentation_loss

    site = patch_site(site_dir, PipelineSpec(PATCH), cache, test_fraction=0.0, num_classes=4)
    settings = _settings(batch_size)
    report = train_batches(_model(), PatchBatches(site, batch_size, seed), settings, segmentation_loss())
    return report.samples / report.seconds


def plain_loader(site_dir: Path, batch_size: int, seed: int):
    """The hand-written MONAI pipeline: CacheDataset of the same transforms, the same crop, a DataLoader."""
    from monai.data import CacheDataset, DataLoader
    from monai.transforms import (Compose, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd, Orientationd,
                                  RandCropByPosNegLabeld, SpatialPadd)

    from client.patch_pipeline import PATCHES_PER_CASE

    files = sorted((site_dir / "images").glob("*.nii.gz"))
    items = [{"image": str(f), "label": str(site_dir / "labels" / f.name)} for f in files]
    keys = ("image", "label")
    transform = Compose([LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys), Orientationd(keys, "RAS"),
                         NormalizeIntensityd("image", channel_wise=True), SpatialPadd(keys, PATCH),
                         RandCropByPosNegLabeld(keys, "label", PATCH, pos=1, neg=1, num_samples=PATCHES_PER_CASE)])
    transform.set_random_state(seed)
    data = CacheDataset(items, transform, progress=False)
    return DataLoader(data, batch_size=max(1, batch_size // PATCHES_PER_CASE), shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def plain(loader, seed: int) -> float:
    """Patches/s of one epoch of the plain loop over ``loader``."""
    from shared_models.losses import segmentation_loss

    model, loss_fn = _model().train(), segmentation_loss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    samples, started = 0, time.perf_counter()
    for batch in loader:
        x, y = batch["image"].as_tensor().float(), batch["label"].as_tensor().long()
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        samples += len(x)
    return samples / (time.perf_counter() - started)


def throughput(site_dir: Path, cache: Path, batch_size: int, repeats: int) -> dict[str, Any]:
    ours(site_dir, cache, batch_size, seed=0)  # fills the disk cache, as a site's first round does
    loader = plain_loader(site_dir, batch_size, seed=0)
    mine, theirs = [], []
    for r in range(repeats):
        mine.append(ours(site_dir, cache, batch_size, seed=r))
        theirs.append(plain(loader, seed=r))
    a, b = statistics.median(mine), statistics.median(theirs)
    return {"fedsite_patches_per_s": a, "plain_monai_patches_per_s": b, "ratio": a / b, "repeats": repeats}


_MEMORY_PROBE = """
import resource, sys, torch
from pathlib import Path
torch.set_num_threads(1)
from simulations.bench_patches import ours
ours(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), 0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


_WHOLE_IMAGE_PROBE = """
import resource, sys
from client.data import load_site
from client.site_inputs import stack_cases
site = load_site(sys.argv[1], test_fraction=0.0, num_classes=4)
x, y = stack_cases(site.train)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_memory_mib(probe: str, *args: object) -> float:
    """Peak RSS (MiB) of a fresh process running ``probe`` with ``args``."""
    done = subprocess.run([sys.executable, "-c", probe, *map(str, args)], check=True, capture_output=True, text=True)
    return int(done.stdout.split()[-1]) / 1024


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    out = args.out / "bench-3d"
    small, large = args.cases, args.cases * 10
    results: dict[str, Any] = {"patch": list(PATCH), "channels": list(CHANNELS), "volume": [args.size, args.size, args.size * 3 // 4]}
    small_dir = _dataset(out, small, args.size)
    results["throughput"] = t = throughput(small_dir, out / f"cache-{small}", args.batch_size, args.repeats)
    print(f"3D patch training ({small} volumes): fedsite {t['fedsite_patches_per_s']:.2f} patches/s, "
          f"plain MONAI {t['plain_monai_patches_per_s']:.2f} patches/s, ratio {t['ratio']:.3f}")
    large_dir = _dataset(out, large, args.size)
    sizes = ((small, small_dir), (large, large_dir))
    memory = {n: peak_memory_mib(_MEMORY_PROBE, d, out / f"cache-{n}", args.batch_size) for n, d in sizes}
    whole = {n: peak_memory_mib(_WHOLE_IMAGE_PROBE, d) for n, d in sizes}
    results["peak_rss_mib"] = {str(n): m for n, m in memory.items()}
    results["memory_ratio"] = memory[large] / memory[small]
    results["whole_image_peak_rss_mib"] = {str(n): m for n, m in whole.items()}
    print(f"peak resident memory, patch pipeline: {memory[small]:.0f} MiB at {small} volumes, {memory[large]:.0f} MiB at "
          f"{large} (ratio {results['memory_ratio']:.2f}); whole images stacked in memory: {whole[small]:.0f} / "
          f"{whole[large]:.0f} MiB")
    atomic_write_text(out / "bench.json", json.dumps(results, indent=2))
    print(f"written: {out / 'bench.json'}")
    return 0
