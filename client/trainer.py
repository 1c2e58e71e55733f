"""The local training loop and scoring of a site's model.

Kept as lean as a hand-written PyTorch loop (the benchmark holds it to that):
tensors are stacked once, batches are index slices, and the only extras are the
ones a hospital deployment needs -- mixed precision and channels_last on CUDA, a
FedProx proximal term, a guard that refuses to report a diverged (NaN) model, the
local recipe (an optimizer from a registry, continued across rounds; a
learning-rate schedule over the federation; augmentation of training batches),
and a hook for networks whose training step is not "one forward, one step"
(DualNorm-UNet's two-pass recipe, SelfReg's feature losses).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot
from torch import nn

from shared_models.norms.optim import has_projections, project_
from shared_models.protocol import TrainSettings

from .augment import Augmenter
from .optim_recipe import build_optimizer
from .optim_state import StoredOptimizer, restore
from .schedule import LrSchedule, RoundPosition, TailPosition


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/Inf: the site refuses to send or store that model."""


@dataclass(frozen=True)
class TrainReport:
    loss: float
    steps: int
    samples: int
    seconds: float
    optimizer_state: dict | None = field(default=None, repr=False, compare=False)  # never sent: the site keeps it


@dataclass(frozen=True)
class EvalReport:
    dice: float  # mean foreground Dice over classes (classes absent everywhere ignored)
    per_class: tuple[float, ...]
    n: int
    hd95: float = float("nan")  # mean over classes of the 95th-percentile Hausdorff distance (mm)
    hd95_per_class: tuple[float, ...] = ()
    per_case: tuple[tuple[float, ...], ...] = ()  # Dice per test case and foreground class (NaN: class absent)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda``/``cuda:N``/``cpu`` as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def to_batch_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack once into (N, C, *S) float32 and (N, 1, *S) int64 tensors."""
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)), torch.from_numpy(
        np.ascontiguousarray(labels, dtype=np.int64)
    )


def _memory_format(device: torch.device, settings: TrainSettings, ndim: int) -> torch.memory_format:
    if device.type != "cuda" or not settings.channels_last:
        return torch.contiguous_format
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def autocast_for(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return contextlib.nullcontext()


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches; a trailing batch of one sample is merged (BN needs N > 1)."""
    order = torch.randperm(n, generator=generator)
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        last = chunks.pop()  # pop first: chunks[-2] on the left would index the shortened list
        chunks[-1] = torch.cat([chunks[-1], last])
    return chunks


def batches_per_epoch(n: int, batch_size: int) -> int:
    """How many batches :func:`_batches` makes of ``n`` samples (the schedule's steps per epoch)."""
    count = math.ceil(n / batch_size)
    return count - 1 if count > 1 and n % batch_size == 1 else count


class BatchSource(Protocol):
    """Where a training loop gets its (image, label) batches: stacked tensors or a patch loader."""

    spatial_dims: int
    steps_per_epoch: int

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class TensorBatches:
    """Shuffled index-slice batches of tensors stacked once (whole images; one generator across epochs)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.spatial_dims = images.dim() - 2
        self.steps_per_epoch = batches_per_epoch(len(images), batch_size)

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in _batches(len(self.images), self.batch_size, self.generator):
            yield self.images[idx], self.labels[idx]


def train_local(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: TrainSettings,
    loss_fn: nn.Module,
    global_shared: Mapping[str, torch.Tensor] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    **recipe,
) -> TrainReport:
    """Train ``model`` in place for ``settings.epochs`` over (images, labels): :func:`train_batches` over
    :class:`TensorBatches`."""
    source = TensorBatches(images, labels, settings.batch_size, settings.seed)
    return train_batches(model, source, settings, loss_fn, global_shared, progress, **recipe)


def train_batches(
    model: nn.Module,
    source: BatchSource,
    settings: TrainSettings,
    loss_fn: nn.Module,
    global_shared: Mapping[str, torch.Tensor] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    *,
    position: RoundPosition | TailPosition = RoundPosition(),
    optimizer_state: StoredOptimizer | None = None,
) -> TrainReport:
    """Train ``model`` in place for ``settings.epochs`` epochs of ``source``.

    ``global_shared`` (parameter name -> tensor) enables the FedProx term
    ``mu/2 * ||w - w_global||^2`` over those parameters. Norm layers get the
    optimizer groups and post-step projections their registry entry declares.
    ``position`` places this round in the federation's learning-rate schedule;
    ``optimizer_state`` (with ``settings.persist_optimizer``) continues the
    previous round's optimizer. The report carries the optimizer's final state.
    """
    device = resolve_device(settings.device)
    fmt = _memory_format(device, settings, source.spatial_dims + 2)
    model.to(device=device, memory_format=fmt).train()
    use_amp = device.type == "cuda" and settings.amp
    step = _Stepper(model, settings, device, use_amp, global_shared)
    if settings.persist_optimizer:
        restore(step.optimizer, optimizer_state)
    first, total = position.span(source.steps_per_epoch * settings.epochs)
    schedule = LrSchedule(step.optimizer, settings.schedule, settings.warmup_fraction, first, total)
    augment = Augmenter(source.spatial_dims, settings.seed) if settings.augment else None
    custom_step = getattr(model, "training_step", None)
    total_loss, steps, samples = 0.0, 0, 0
    started = time.perf_counter()
    for epoch in range(settings.epochs):
        for x, y in source.epoch():
            if augment is not None:
                x, y = augment(x, y)
            x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
            y = y.to(device, non_blocking=True)
            schedule.set(steps)
            with autocast_for(device, use_amp):
                if custom_step is not None:
                    loss_value = custom_step(x, y, loss_fn, step)
                else:
                    loss = loss_fn(model(x), y)
                    step(loss)
                    loss_value = loss.detach()
            total_loss += float(loss_value)
            steps += 1
            samples += len(x)
        if progress is not None:
            progress(epoch + 1, settings.epochs, total_loss / max(steps, 1))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    mean_loss = total_loss / max(steps, 1)
    if not math.isfinite(mean_loss):
        raise TrainingDivergedError(f"non-finite mean training loss {mean_loss}")
    return TrainReport(loss=mean_loss, steps=steps, samples=samples, seconds=time.perf_counter() - started,
                       optimizer_state=step.optimizer.state_dict())


class _Stepper:
    """One optimizer step from a loss: FedProx term, divergence guard, (scaled) backward, projections.

    Networks with their own training step (DualNorm-UNet, SelfReg) receive this
    callable, so every step of every network goes through the same guard and projections.
    """

    def __init__(self, model: nn.Module, settings: TrainSettings, device: torch.device, use_amp: bool,
                 global_shared: Mapping[str, torch.Tensor] | None):
        self.model, self.mu = model, settings.proximal_mu
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, settings)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp and not torch.cuda.is_bf16_supported())
        self.project = has_projections(model)
        self.prox = []
        if self.mu > 0 and global_shared:
            named = dict(model.named_parameters())
            self.prox = [(named[k], v.to(device)) for k, v in global_shared.items() if k in named]

    def __call__(self, loss: torch.Tensor, clip_value: float | None = None) -> None:
        if self.prox:
            loss = loss + 0.5 * self.mu * sum(((p - g) ** 2).sum() for p, g in self.prox)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(f"non-finite training loss ({loss.item()}); lower the learning rate")
        self.scaler.scale(loss).backward()
        if clip_value is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_value_(self.params, clip_value)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.project:
            project_(self.model)


@torch.no_grad()
def predict_labels(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 16, amp: bool = True) -> torch.Tensor:
    """Arg-max label maps (N, 1, *S) of ``model`` in eval mode."""
    model.to(device).eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device)
        with autocast_for(device, amp):
            logits = model(x)
        outputs.append(logits.float().argmax(dim=1, keepdim=True).cpu())
    return torch.cat(outputs)


def evaluate_dice(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, device: str = "cpu", batch_size: int = 16,
    with_hd95: bool = True, spacing: Sequence[Sequence[float]] | None = None,
) -> EvalReport:
    """Mean foreground Dice (MONAI DiceMetric) of ``model`` on a held-out split; HD95 in mm with ``spacing``.

    Per class, Dice is averaged over the cases where the class is present in the
    ground truth (MONAI ``ignore_empty``); the site's score is the mean over classes.
    ``spacing``: each case's voxel size in mm (None or empty: 1 per voxel).
    """
    pred = predict_labels(model, images, resolve_device(device), batch_size)
    pred_1h, true_1h = one_hot(pred, num_classes), one_hot(labels, num_classes)
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    metric(pred_1h, true_1h)
    per_class = metric.aggregate().tolist()
    per_case = tuple(tuple(float(v) for v in row) for row in metric.get_buffer().tolist())
    hd_per_class = hd95_per_class(pred_1h, true_1h, spacing) if with_hd95 else [float("nan")] * (num_classes - 1)
    return EvalReport(
        dice=finite_mean(per_class),
        per_class=tuple(float(v) for v in per_class),
        n=len(images),
        hd95=finite_mean(hd_per_class),
        hd95_per_class=tuple(hd_per_class),
        per_case=per_case,
    )


def finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def hd95_per_class(pred_1h: torch.Tensor, true_1h: torch.Tensor, spacing: Sequence[Sequence[float]] | None = None) -> list[float]:
    """MONAI's 95th-percentile Hausdorff distance per foreground class, in mm (in voxels without ``spacing``).

    ``spacing``: one voxel size per case (mm per array axis). Cases without the
    class in the ground truth are ignored; a class present in the ground truth but
    never predicted counts as the image diagonal in mm (the worst possible
    distance) instead of infinity, so one miss cannot erase a mean.
    """
    n, dims = pred_1h.shape[0], pred_1h.ndim - 2
    per_case = [tuple(float(v) for v in s) for s in spacing] if spacing else [(1.0,) * dims] * n
    if len(per_case) != n or any(len(s) != dims for s in per_case):
        raise ValueError(f"spacing: expected {n} cases x {dims} axes, got {per_case}")
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # MONAI warns for every empty class
        values = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(pred_1h, true_1h, spacing=per_case)
    extent = np.asarray(pred_1h.shape[2:], dtype=float)
    diagonal = torch.tensor([float(np.linalg.norm(extent * np.asarray(s))) for s in per_case], dtype=values.dtype)
    diagonal = diagonal[:, None].expand_as(values)
    present = true_1h[:, 1:].flatten(2).any(dim=2)
    predicted = pred_1h[:, 1:].flatten(2).any(dim=2)
    values = torch.where(present & ~predicted, diagonal, values)
    values = torch.where(present, values, torch.full_like(values, float("nan")))
    return [finite_mean(values[:, c].tolist()) for c in range(values.shape[1])]
