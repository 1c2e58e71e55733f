"""The statistics refresh before scoring: site-local statistics follow the final weights, nothing else moves."""

import pytest
import torch
from torch import nn

from client.refresh import has_local_statistics, refresh_statistics
from shared_models import partition
from shared_models.norms.bin import BatchInstanceNorm


def _model(norm):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), norm, nn.ReLU(), nn.Conv2d(4, 2, 1))


def _images():
    torch.manual_seed(1)
    return torch.randn(12, 1, 8, 8) * 2 + 3


@pytest.mark.parametrize("norm", [nn.BatchNorm2d(4), BatchInstanceNorm(4, 2)])
def test_local_statistics_become_those_of_the_sites_images_under_the_current_weights(norm):
    model, images = _model(norm), _images()
    split = partition(model, "fedbn")
    assert has_local_statistics(split)
    params = {k: v.clone() for k, v in model.named_parameters()}
    refresh_statistics(model, images, split, batch_size=4, device=torch.device("cpu"))
    with torch.no_grad():
        features = model[0](images)
    expected_mean = features.mean(dim=(0, 2, 3))
    torch.testing.assert_close(model[1].running_mean, expected_mean, atol=1e-5, rtol=1e-5)
    per_batch_var = torch.stack([features[i : i + 4].var(dim=(0, 2, 3), unbiased=True) for i in (0, 4, 8)]).mean(0)
    torch.testing.assert_close(model[1].running_var, per_batch_var, atol=1e-4, rtol=1e-4)
    for key, value in model.named_parameters():
        assert torch.equal(value, params[key]), key  # no gradient step
    assert not model.training


def test_shared_statistics_are_left_as_the_federation_sent_them():
    model, images = _model(nn.BatchNorm2d(4)), _images()
    split = partition(model, "fedavg")
    assert not has_local_statistics(split)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    refresh_statistics(model, images, split, batch_size=4, device=torch.device("cpu"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_stale_statistic_is_what_the_refresh_fixes():
    """Weights changed after the statistics were taken (an aggregation): the refresh brings them back in line."""
    model, images = _model(nn.BatchNorm2d(4)), _images()
    split = partition(model, "fedbn")
    refresh_statistics(model, images, split, 4, torch.device("cpu"))
    with torch.no_grad():
        model[0].weight.mul_(3.0)  # "aggregation"
        stale = model[1].running_mean.clone()
    refresh_statistics(model, images, split, 4, torch.device("cpu"))
    with torch.no_grad():
        fresh_mean = model[0](images).mean(dim=(0, 2, 3))
    torch.testing.assert_close(model[1].running_mean, fresh_mean, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(stale, fresh_mean, atol=1e-3)
