"""Norm statistics consistent with the weights a site deploys.

A site's running statistics are estimated during local training, under the
weights it had *before* aggregation; after the last aggregation the shared
weights change and those statistics no longer describe the activations the
deployed model produces. A refresh pass re-estimates them on the site's own
training images under the final weights: forward passes only, no gradient and
no optimizer step, so nothing learned changes. Only statistics that stay at the
site are refreshed; shared statistics (FedAvg's) are the federation's and stay.
"""

from __future__ import annotations

import torch
from torch import nn

from shared_models.norms import TensorRole
from shared_models.partition import Split

from .adapt import adabn, sn_batch_average

def has_local_statistics(split: Split) -> bool:
    return any(split.roles.get(k) is TensorRole.STATISTIC for k in split.local)


@torch.no_grad()
def refresh_statistics(model: nn.Module, images: torch.Tensor, split: Split, batch_size: int, device: torch.device) -> None:
    """Re-estimate the site-local running statistics over ``images`` (AdaBN's pass, and Switchable
    Norm's batch average), then put back every tensor the site does not own."""
    keep = {k: v.clone() for k, v in model.state_dict().items() if k not in set(split.local)}
    adabn(model, images, batch_size, str(device))
    sn_batch_average(model, images, batch_size, "mean", str(device))
    model.load_state_dict(keep, strict=False)  # shared statistics are the federation's
    model.eval()
