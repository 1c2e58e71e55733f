"""Segmentation losses: MONAI's Dice + cross-entropy, optionally with SelfReg.

``LOSSES`` names what an experiment may ask for; ``make_loss`` builds it for a
model (SelfReg attaches feature taps to the model, so it needs the model).
"""

from __future__ import annotations

from monai.losses import DiceCELoss
from torch import nn

LOSSES = ("dicece", "selfreg")


def segmentation_loss(lambda_dice: float = 1.0, lambda_ce: float = 1.0) -> nn.Module:
    """Soft Dice + CE over one-hot labels of shape (N, 1, *S) and logits (N, K, *S)."""
    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)


def make_loss(name: str, model: nn.Module, seed: int = 0) -> nn.Module:
    """The training loss ``name`` for ``model``.

    ``selfreg`` adds SelfReg-UNet's two feature regularisers (paper weight) on top
    of Dice + CE; they only act in training, so inference cost is unchanged.
    """
    if name == "dicece":
        return segmentation_loss()
    if name == "selfreg":
        from .selfreg import enable_selfreg

        enable_selfreg(model, seed=seed)
        return segmentation_loss()
    raise ValueError(f"unknown loss {name!r} (known: {', '.join(LOSSES)})")
