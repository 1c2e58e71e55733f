"""Segmentation losses (MONAI's Dice + cross-entropy on softmax probabilities)."""

from __future__ import annotations

from monai.losses import DiceCELoss
from torch import nn


def segmentation_loss(lambda_dice: float = 1.0, lambda_ce: float = 1.0) -> nn.Module:
    """Soft Dice + CE over one-hot labels of shape (N, 1, *S) and logits (N, K, *S)."""
    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)
