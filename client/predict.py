"""``fedsite predict --site-config site.yaml --input PATH --output PATH``.

Segments NIfTI images with a site's *personalised* model, offline, without the
server: the newest global shared tensors the site received
(``<state-dir>/<run>/global_shared.pt``, written atomically by the ClientApp on
every train/evaluate message, with the model spec, policy, fingerprint and input
normalization) plus the site's own local tensors: those its last evaluation scored
(``<state-dir>/<run>/deployed_state.pt``, statistics refreshed under the final
weights) or, without one, those of its last training (``local_state.pt``). Both files are checked (run, checksum,
fingerprint, policy, key set) before anything is loaded.

The input is read and normalized exactly as in training (``client/case_read.py``;
a multi-modality model takes ``case_0000``, ``case_0001``, ... files, or one 4D
file). If the site's data was made by ``fedsite prepare-data`` (its
``dataset.json``), the image is first reoriented and resampled the same way
(MONAI ``Orientationd``/``Spacingd``). It is padded at the end of each axis to a
multiple of 16 (so every downsampling level fits) and cropped back, and the label
map is brought back to the input's own grid (MONAI ``Invertd``, nearest
neighbour) and written with the input's affine and header: same shape, affine and
orientation, one file per case (a folder maps to a folder; ``case_0000`` files
give ``case.nii.gz``).
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


def training_geometry(snap, prepared):
    """(orientation, spacing) training read the site's cases in, or None for the files' own grid.

    A model trained on patches saw every case in RAS at the plan's voxel size (its
    own, or ``prepare-data``'s, when the plan kept it native); a whole-image model
    saw what ``prepare-data`` wrote, if it ran.
    """
    from shared_models.protocol import TARGET_SPACING, parse_sizes

    from .patch_pipeline import ORIENTATION

    if not snap.patch_size:
        return prepared
    spacing = parse_sizes(snap.target_spacing, TARGET_SPACING, float) or (prepared[1] if prepared else None)
    return ORIENTATION, spacing


def _label_map(model, image, device: str, patch: tuple[int, ...]):
    """Arg-max labels (*S) of a normalised image (C, *S): a sliding window of the training patch, or one whole pass."""
    import numpy as np
    import torch

    from .trainer import predict_labels, resolve_device

    if patch:
        from .patch_eval import window_logits

        return window_logits(model, torch.from_numpy(image), patch, resolve_device(device)).argmax(dim=1)[0]
    shape = image.shape[1:]
    pad = [(0, 0)] + [(0, -s % PAD_MULTIPLE) for s in shape]
    labels = predict_labels(model, torch.from_numpy(np.pad(image, pad))[None], resolve_device(device), batch_size=1)[0, 0]
    return labels[tuple(slice(0, s) for s in shape)]


def segment(model, image_files, intensity: str, device: str = "cpu", geometry=None, in_channels: int | None = None,
            patch: tuple[int, ...] = ()):
    """Label map (numpy int64, the input's own voxel grid) of one case.

    ``image_files``: one file, or one per modality in channel order. ``geometry``
    (orientation, spacing) is the preprocessing training saw (:func:`training_geometry`): the image is reoriented and resampled to it with MONAI,
    segmented, and the labels are brought back to the input's grid by inverting
    those transforms with nearest-neighbour interpolation. ``patch``: the training
    patch, slid over the image with Gaussian blending (else one whole-image pass).
    """
    import numpy as np
    from monai.data import MetaTensor
    from monai.transforms import Invertd, NormalizeIntensityd
    from monai.utils import convert_to_numpy

    from .case_files import read_header
    from .case_read import geometry_transforms
    files = [Path(f) for f in ([image_files] if isinstance(image_files, (str, Path)) else image_files)]
    dims = len(read_header(files[0], "image").shape)
    orientation, spacing = geometry or (None, None)
    pre = geometry_transforms(("image",), dims, orientation, spacing, modes=("bilinear",), padding=("border",))
    try:
        data = pre({"image": [str(f) for f in files] if len(files) > 1 else str(files[0])})
    except Exception as exc:  # the reader raises anything on a damaged file
        raise PredictError(f"{files[0]}: unreadable image ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    image = convert_to_numpy(data["image"], dtype=np.float32)
    if in_channels is not None and image.shape[0] != in_channels:
        raise PredictError(f"{files[0]}: image has {image.shape[0]} channels, the model takes {in_channels}")
    if not np.isfinite(image).all():
        raise PredictError(f"{files[0]}: image contains NaN/Inf voxels")
    if intensity == "zscore":  # as in training (client.case_read), per channel
        image = convert_to_numpy(NormalizeIntensityd("image", channel_wise=True)({"image": image})["image"], dtype=np.float32)
    labels = _label_map(model, image, device, tuple(patch))
    if geometry is None:
        return labels.numpy().astype(np.int64)
    meta = data["image"]
    data["pred"] = MetaTensor(labels[None].float(), meta=meta.meta, applied_operations=meta.applied_operations)
    back = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True)(data)["pred"]
    return np.rint(convert_to_numpy(back, dtype=np.float32)[0]).astype(np.int64)


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


def _inputs(path: Path, out: Path, channels: int = 1) -> list[tuple[tuple[Path, ...], Path]]:
    """(image files of one case, output file) per case: one file per case, or ``case_0000..`` files when channels > 1."""
    from .case_files import CHANNEL, case_name

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.endswith(SUFFIXES) and not p.name.startswith("."))
        if not files:
            raise PredictError(f"{path}: no .nii/.nii.gz files")
    elif path.is_file():
        files = [path]
        m = CHANNEL.match(case_name(path) or "")
        if channels > 1 and m:  # one modality named: the case is every sibling _NNNN file
            files = sorted(p for p in path.parent.iterdir() if (n := CHANNEL.match(case_name(p) or "")) and n.group("case") == m.group("case"))
    else:
        raise PredictError(f"{path}: no such file or folder")
    groups: dict[str, list[Path]] = {}
    for f in files:
        m = CHANNEL.match(case_name(f) or "")
        key = f"{m.group('case')}{f.name[len(case_name(f)):]}" if channels > 1 and m else f.name
        groups.setdefault(key, []).append(f)
    single = path.is_file() and not out.is_dir()
    return [(tuple(fs), out if single else out / name) for name, fs in sorted(groups.items())]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--site-config", type=Path, help="the site's site.yaml (state-dir, site-id)")
    where.add_argument("--run-dir", type=Path, help="a simulated federation, OUT/runs/<cell> of `fedsite simulate` (with --site)")
    parser.add_argument("--site", help="with --run-dir: the simulated site whose personalised model segments")
    parser.add_argument("--input", type=Path, required=True, help="a NIfTI image or a folder of them")
    parser.add_argument("--output", type=Path, required=True, help="output file (for one image) or folder")
    parser.add_argument("--run", help="run name (default: the run the site took part in last)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")


def _site_of(args: argparse.Namespace) -> tuple[str, Path, Path | None]:
    """(site id, state dir, data dir or None): from a deployed site's site.yaml, or a simulated cell's folder."""
    from shared_models.config import load_config
    from shared_models.protocol import SIM_SITE_STATE as SIM_STATE_DIR

    from .daemon import SiteConfig, resolve_path

    if args.site_config is not None:
        cfg = load_config(SiteConfig, args.site_config)
        base = args.site_config.resolve().parent
        return cfg.site_id, resolve_path(base, cfg.state_dir), resolve_path(base, cfg.data_dir)
    states = args.run_dir / SIM_STATE_DIR
    sites = sorted(p.name for p in states.iterdir() if p.is_dir()) if states.is_dir() else []
    if not sites:
        raise PredictError(f"{args.run_dir}: no {SIM_STATE_DIR}/ folder (not a cell of `fedsite simulate`: OUT/runs/<cell>)")
    if args.site not in sites:
        raise PredictError(f"{args.run_dir}: --site {args.site!r} is not one of its sites ({', '.join(sites)})")
    return args.site, states / args.site, None


def run(args: argparse.Namespace) -> int:
    from shared_models.config import ConfigError
    from shared_models.protocol import PATCH_SIZE, parse_sizes

    from .prepare import prepared_geometry

    try:
        site_id, state_dir, data_dir = _site_of(args)
        model, snap = personalised_model(state_dir, site_id, args.run)
        channels = int(snap.model_spec.get("in-channels", snap.model_spec.get("in_channels", 1)))
        geometry = training_geometry(snap, prepared_geometry(data_dir) if data_dir else None)
        patch = parse_sizes(snap.patch_size, PATCH_SIZE, int)
        pairs = _inputs(args.input, args.output, channels)
        for src, dst in pairs:
            write_label(segment(model, src, snap.intensity, args.device, geometry, channels, patch), src[0], dst)
            print(f"{', '.join(map(str, src))} -> {dst}")
    except (ConfigError, PredictError, RuntimeError, ValueError, OSError) as exc:
        print(f"fedsite predict: {exc}", file=sys.stderr)
        return 1
    how = f"; {geometry[0]} at {geometry[1]} mm, written back in each input's grid" if geometry else ""
    print(f"site {site_id}: run {snap.run_name}, global model of round {snap.round} + site-local tensors; {len(pairs)} image(s){how}")
    return 0
