"""``fedsite predict --site-config site.yaml --input PATH --output PATH``.

Segments NIfTI images with a site's *personalised* model, offline, without the
server: the newest global shared tensors the site received
(``<state-dir>/<run>/global_shared.pt``, written atomically by the ClientApp on
every train/evaluate message, with the model spec, policy, fingerprint and input
normalization) plus the site's own local tensors: those its last evaluation scored
(``<state-dir>/<run>/deployed_state.pt``, statistics refreshed under the final
weights) or, without one, those of its last training (``local_state.pt``). Both files are checked (run, checksum,
fingerprint, policy, key set) before anything is loaded.

The input is read and normalized exactly as in training (``client/data.py``),
padded at the end of each axis to a multiple of 16 (so every downsampling
level fits) and cropped back; the label map is written with the input's affine
and header, one file per input (a folder maps to a folder, same file names).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

PAD_MULTIPLE = 16
SUFFIXES = (".nii.gz", ".nii")


class PredictError(RuntimeError):
    """The site has no usable model or the input cannot be segmented."""


def latest_run(state_dir: Path) -> str:
    """The run whose global model the site received last."""
    from .global_store import GLOBAL_FILE

    found = sorted(state_dir.glob(f"*/{GLOBAL_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise PredictError(f"{state_dir}: no global model stored; has this site taken part in a federation?")
    return found[-1].parent.name


def personalised_model(state_dir: Path, site: str, run_name: str | None = None):
    """(model in eval mode, snapshot): the site's fine-tuned model, else global shared + this site's local tensors."""
    from flwr.app import ArrayRecord

    from shared_models import architecture_fingerprint, build_model, partition
    from shared_models.partition import Policy

    from .exchange import load_local, load_shared
    from .global_store import load_global
    from .site_state import DEPLOYED_FILE, PERSONAL_FILE, SiteStateStore

    run_name = run_name or latest_run(state_dir)
    snap = load_global(state_dir, run_name)
    model = build_model(snap.model_spec, seed=0)
    fingerprint = architecture_fingerprint(model)
    if fingerprint != snap.fingerprint:
        raise PredictError(f"model fingerprint {fingerprint} differs from the stored global model's {snap.fingerprint} (fedsite version changed?)")
    policy = Policy.parse(snap.policy, snap.policy_overrides)
    split = partition(model, policy)
    personal = SiteStateStore(state_dir, run_name, site, PERSONAL_FILE)  # fine-tuned at the site: every tensor
    if personal.exists():
        tensors, _ = personal.load(fingerprint=fingerprint, policy=policy.name, expected_keys=set(model.state_dict()))
        model.load_state_dict(tensors)
        return model.eval(), snap
    load_shared(model, ArrayRecord({k: v for k, v in snap.tensors.items()}), split, site)
    if split.local:
        deployed = SiteStateStore(state_dir, run_name, site, DEPLOYED_FILE)  # statistics refreshed at the last evaluation
        store = deployed if deployed.exists() else SiteStateStore(state_dir, run_name, site)
        if not store.exists():
            raise PredictError(f"{store.path}: no site-local tensors; this site never trained in run {run_name!r}")
        tensors, _ = store.load(fingerprint=fingerprint, policy=policy.name, expected_keys=set(split.local))
        load_local(model, tensors)
    return model.eval(), snap


def segment(model, image_path: Path, intensity: str, device: str = "cpu"):
    """Label map (numpy, the input's voxel grid) of one image."""
    import numpy as np
    import torch
    from monai.transforms import NormalizeIntensity

    from .data import read_image
    from .trainer import predict_labels, resolve_device

    image = read_image(image_path, "image")  # (1, *S) float32, as in training
    if not np.isfinite(image).all():
        raise PredictError(f"{image_path}: image contains NaN/Inf voxels")
    if intensity == "zscore":
        image = np.asarray(NormalizeIntensity()(image), dtype=np.float32)
    shape = image.shape[1:]
    pad = [(0, 0)] + [(0, -s % PAD_MULTIPLE) for s in shape]
    x = torch.from_numpy(np.pad(image, pad))[None]
    labels = predict_labels(model, x, resolve_device(device), batch_size=1)[0, 0].numpy()
    return labels[tuple(slice(0, s) for s in shape)]


def write_label(labels, like: Path, out: Path) -> None:
    """Save ``labels`` with the affine and header of ``like`` (2D as (H, W, 1) if so stored)."""
    import nibabel as nib
    import numpy as np

    ref = nib.load(str(like))
    data = labels.reshape(ref.shape) if labels.size == int(np.prod(ref.shape)) else labels
    header = ref.header.copy()
    header.set_data_dtype(np.int16)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = next((s for s in SUFFIXES if out.name.endswith(s)), ".nii.gz")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp{suffix}")  # nibabel picks the format from the suffix
    try:
        nib.save(nib.Nifti1Image(data.astype(np.int16), ref.affine, header), str(tmp))
        os.replace(tmp, out)  # a reader never sees a half-written label map
    finally:
        tmp.unlink(missing_ok=True)


def _inputs(path: Path, out: Path) -> list[tuple[Path, Path]]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.endswith(SUFFIXES) and not p.name.startswith("."))
        if not files:
            raise PredictError(f"{path}: no .nii/.nii.gz files")
        return [(p, out / p.name) for p in files]
    if not path.is_file():
        raise PredictError(f"{path}: no such file or folder")
    return [(path, out / path.name if out.is_dir() else out)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--site-config", type=Path, required=True, help="the site's site.yaml (state-dir, site-id)")
    parser.add_argument("--input", type=Path, required=True, help="a NIfTI image or a folder of them")
    parser.add_argument("--output", type=Path, required=True, help="output file (for one image) or folder")
    parser.add_argument("--run", help="run name (default: the run the site took part in last)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")


def run(args: argparse.Namespace) -> int:
    from shared_models.config import ConfigError, load_config

    from .daemon import SiteConfig, resolve_path

    try:
        cfg = load_config(SiteConfig, args.site_config)
        state_dir = resolve_path(args.site_config.resolve().parent, cfg.state_dir)
        pairs = _inputs(args.input, args.output)
        model, snap = personalised_model(state_dir, cfg.site_id, args.run)
        for src, dst in pairs:
            write_label(segment(model, src, snap.intensity, args.device), src, dst)
            print(f"{src} -> {dst}")
    except (ConfigError, PredictError, RuntimeError, ValueError, OSError) as exc:
        print(f"fedsite predict: {exc}", file=sys.stderr)
        return 1
    print(f"site {cfg.site_id}: run {snap.run_name}, global model of round {snap.round} + site-local tensors; {len(pairs)} image(s)")
    return 0
