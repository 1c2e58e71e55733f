"""Parameter and MAC counting: each counted layer type against its closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shared_models.complexity import count_macs, count_parameters, macs_by_module


def test_count_parameters_counts_every_element_and_respects_trainable_only():
    # Prepare
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 2))
    model[2].weight.requires_grad_(False)
    # Execute / Assert
    assert count_parameters(model) == (3 * 8 * 9 + 8) + 2 * 8 + (8 * 2 + 2)
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - 16


CASES = [
    # (module, input shape, expected MACs)
    (nn.Conv2d(3, 8, 3, padding=1), (1, 3, 10, 10), 8 * 100 * 3 * 9),
    (nn.Conv2d(8, 8, 3, padding=1, groups=8), (2, 8, 6, 6), 2 * 8 * 36 * 9),
    (nn.Conv3d(2, 4, (3, 3, 1), padding=(1, 1, 0)), (1, 2, 4, 5, 6), 4 * 120 * 2 * 9),
    (nn.ConvTranspose2d(4, 2, 2, stride=2), (1, 4, 5, 5), 100 * 2 * 4),
    (nn.Linear(10, 5), (2, 3, 10), 2 * 3 * 5 * 10),
    (nn.BatchNorm2d(8), (1, 8, 10, 10), 0),  # element-wise: not a multiply-accumulate of a layer
    (nn.ReLU(), (1, 8, 3, 3), 0),
]


@pytest.mark.parametrize("module,shape,expected", CASES)
def test_count_macs_matches_closed_form(module, shape, expected):
    assert count_macs(module, shape) == expected


def test_attention_written_with_torch_matmul_is_counted():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)), -1), v)

    n, t, d = 2, 5, 8
    assert count_macs(Attention(), (n, t, d)) == n * t * d * 24 + 2 * n * t * t * d


def test_count_macs_sums_layers_restores_mode_and_leaves_no_hooks():
    # Prepare
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).train()
    # Execute
    per_module = macs_by_module(model, (1, 1, 8, 8))
    # Assert
    assert per_module == {"0": 4 * 64 * 9, "3": 2 * 64 * 4}
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_module_called_twice_is_counted_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    assert count_macs(Twice(), (1, 4)) == 2 * 16


def test_count_macs_uses_no_grad():
    model = nn.Linear(3, 3)
    count_macs(model, (1, 3))
    assert model.weight.grad is None
    assert torch.is_grad_enabled()
