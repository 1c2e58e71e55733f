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
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn

from shared_models.norms import TensorRole
from shared_models.norms.bin import BatchInstanceNorm
from shared_models.norms.switchable import SwitchNorm, recompute_sn_bn_stats
from shared_models.partition import Split

EVAL_STATISTICS = ("refresh", "stored")  # stored: the statistics of the last local training, as the papers score


def has_local_statistics(split: Split) -> bool:
    return any(split.roles.get(k) is TensorRole.STATISTIC for k in split.local)


@torch.no_grad()
def refresh_statistics(model: nn.Module, images: torch.Tensor, split: Split, batch_size: int, device: torch.device) -> int:
    """Re-estimate the site-local running statistics over ``images``; returns the number of batches used."""
    keep = {k: v.clone() for k, v in model.state_dict().items() if k not in set(split.local)}
    model.to(device)
    batches = [images[i : i + batch_size].to(device) for i in range(0, len(images), batch_size)]
    batches = [b for b in batches if len(b) > 1] or batches  # BN needs N > 1 in train mode
    bins = [m for m in model.modules() if isinstance(m, BatchInstanceNorm)]
    momenta = [m.momentum for m in bins]
    for layer in bins:  # cumulative average, as update_bn does for nn.BatchNorm
        layer.running_mean.zero_()
        layer.running_var.fill_(1.0)
        layer.num_batches_tracked.zero_()
        layer.momentum = None
    try:
        update_bn(batches, model)  # every _BatchNorm; BIN layers see the same train-mode passes
        if bins and not any(isinstance(m, _BatchNorm) for m in model.modules()):
            model.train()  # update_bn skips a model without _BatchNorm
            for batch in batches:
                model(batch)
    finally:
        for layer, momentum in zip(bins, momenta):
            layer.momentum = momentum
    if any(isinstance(m, SwitchNorm) for m in model.modules()):
        recompute_sn_bn_stats(model, batches, len(batches))
    model.load_state_dict(keep, strict=False)  # shared statistics are the federation's
    model.eval()
    return len(batches)
