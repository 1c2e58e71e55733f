"""Scoring a site's model case by case with a sliding window (the patch pipeline's evaluation).

A model trained on patches sees whole cases only through windows of the patch
size; MONAI's ``sliding_window_inference`` blends overlapping windows with a
Gaussian so the seams of the tiling do not show. Each case is scored in its own
shape (no padding to the site's largest case), Dice with MONAI's ``DiceMetric``
and HD95 in mm with the case's own voxel size, then averaged as
:func:`client.trainer.evaluate_dice` averages: per class over the cases where
the class is present, the site's score the mean over classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from torch import nn

from .patch_pipeline import PatchSite
from .trainer import EvalReport, autocast_for, finite_mean, hd95_per_class, resolve_device

OVERLAP = 0.5  # nnU-Net's tile step of half a patch
WINDOWS_PER_BATCH = 4


@torch.no_grad()
def window_logits(model: nn.Module, image: torch.Tensor, patch: Sequence[int], device: torch.device, amp: bool = True) -> torch.Tensor:
    """Logits (1, K, *S) of one case (C, *S) by Gaussian-blended windows of size ``patch``, on the CPU."""
    model.to(device).eval()
    with autocast_for(device, amp):
        logits = sliding_window_inference(image[None].to(device), tuple(patch), WINDOWS_PER_BATCH, model,
                                          overlap=OVERLAP, mode="gaussian", sw_device=device, device=torch.device("cpu"))
    return torch.as_tensor(logits).float()


def evaluate_windows(model: nn.Module, site: PatchSite, indices: Sequence[int], device: str = "cpu", with_hd95: bool = True) -> EvalReport:
    """Dice (and HD95 in mm) of ``model`` on the cases ``indices`` of ``site``, one sliding window pass each."""
    torch_device = resolve_device(device)
    classes = site.num_classes
    dice = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    hd_rows = []
    for index in indices:
        case = site.cases[index]
        pred = window_logits(model, case["image"], site.spec.patch, torch_device).argmax(dim=1, keepdim=True)
        pred_1h, true_1h = one_hot(pred, classes), one_hot(case["label"][None].long(), classes)
        dice(pred_1h, true_1h)
        if with_hd95:
            hd_rows.append(hd95_per_class(pred_1h, true_1h, [case["spacing"].tolist()]))
    per_class = dice.aggregate().tolist()
    per_case = tuple(tuple(float(v) for v in row) for row in dice.get_buffer().tolist())
    hd = [finite_mean(list(col)) for col in zip(*hd_rows)] if hd_rows else [float("nan")] * (classes - 1)
    return EvalReport(dice=finite_mean(per_class), per_class=tuple(float(v) for v in per_class), n=len(indices),
                      hd95=finite_mean(hd), hd95_per_class=tuple(hd), per_case=per_case)
