"""SegNetr reconstruction (methods.md §4.6): partitions, shapes, reach, cost, budget, FL split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared_models import build_model, partition
from shared_models.complexity import count_macs, count_parameters
from shared_models.config import ConfigError
from shared_models.nets.segnetr import (
    IRSC,
    SegNetrBlock,
    SegNetrConfig,
    depth_to_space,
    grid_partition,
    grid_reverse,
    space_to_depth,
    window_partition,
    window_reverse,
)

SMALL = {"name": "segnetr", "channels": [8, 16, 32]}


# ----------------------------------------------------------------- partitions
@pytest.mark.parametrize("shape", [(2, 3, 16, 24), (1, 2, 8, 12, 4)])
def test_window_partition_round_trip_is_exact(shape):
    x = torch.randn(shape)
    size = 4
    tokens = window_partition(x, size)
    assert tokens.shape[1:] == (shape[1], size ** (len(shape) - 2))
    assert torch.equal(window_reverse(tokens, size, shape[2:]), x)


@pytest.mark.parametrize("shape", [(2, 3, 16, 24), (1, 2, 8, 12, 4)])
def test_grid_partition_round_trip_is_exact(shape):
    x = torch.randn(shape)
    size = 4
    tokens = grid_partition(x, size)
    assert tokens.shape[1:] == (shape[1], size ** (len(shape) - 2))
    assert torch.equal(grid_reverse(tokens, size, shape[2:]), x)


def test_window_is_contiguous_and_grid_is_strided_over_the_whole_map():
    x = torch.randn(1, 2, 16, 24)
    # first window: the top-left 4x4 block; first grid: every (16/4, 24/4)-th pixel
    assert torch.equal(window_partition(x, 4)[0], x[0, :, :4, :4].reshape(2, 16))
    assert torch.equal(grid_partition(x, 4)[0], x[0, :, ::4, ::6].reshape(2, 16))


def test_partition_rejects_indivisible_sizes():
    with pytest.raises(ValueError):
        window_partition(torch.randn(1, 1, 10, 8), 4)


@pytest.mark.parametrize("shape", [(2, 3, 6, 8), (1, 2, 4, 6, 2)])
def test_space_to_depth_round_trip_is_exact(shape):
    x = torch.randn(shape)
    assert torch.equal(depth_to_space(space_to_depth(x)), x)


def test_space_to_depth_is_pixel_unshuffle_in_2d():
    x = torch.randn(2, 3, 6, 8)
    assert torch.equal(space_to_depth(x), F.pixel_unshuffle(x, 2))
    assert torch.equal(depth_to_space(space_to_depth(x)), F.pixel_shuffle(F.pixel_unshuffle(x, 2), 2))


# ----------------------------------------------------------------- block and skip
@pytest.mark.parametrize("spatial", [(16, 16), (13, 21), (5, 7, 6)])
def test_block_preserves_shape_for_any_size(spatial):
    block = SegNetrBlock(len(spatial), 8, norm="group", window=4)
    x = torch.randn(2, 8, *spatial)
    assert block(x).shape == x.shape


def test_irsc_preserves_shape_for_odd_sizes():
    skip = IRSC(SegNetrConfig(channels=(8, 16), norm="group", window=4), 8)
    x = torch.randn(1, 8, 11, 9)
    assert skip(x).shape == x.shape


def _reach(block: SegNetrBlock, source: tuple[int, int], target: tuple[int, int]) -> float:
    """|d out[target] / d in[source]| summed over channels (eval-mode BN: no batch coupling)."""
    x = torch.randn(1, 8, 32, 32, requires_grad=True)
    block(x)[0, :, target[0], target[1]].sum().backward()
    return float(x.grad[0, :, source[0], source[1]].abs().sum())


def _block(**kwargs) -> SegNetrBlock:
    # SE off: its global average would connect every pixel and hide what the branches do
    return SegNetrBlock(2, 8, norm="batch", window=8, se_ratio=0.0, **kwargs).eval()


def test_one_block_reaches_a_far_pixel_only_through_the_global_branch():
    far = (32 - 4, 32 - 4)  # same grid group as (0, 0): 32/8 = 4 pixels apart, other window
    assert _reach(_block(), (0, 0), far) > 0
    assert _reach(_block(use_global=False), (0, 0), far) == 0


def test_sequential_layout_reaches_the_opposite_corner_in_one_block():
    corner = (31, 31)
    assert _reach(_block(layout="sequential"), (0, 0), corner) > 0
    assert _reach(_block(layout="sequential", use_global=False), (0, 0), corner) == 0


# ----------------------------------------------------------------- cost
def test_block_macs_grow_linearly_with_pixels():
    block = SegNetrBlock(2, 16, window=8)
    ratio = count_macs(block, (1, 16, 32, 64)) / count_macs(block, (1, 16, 32, 32))
    assert 1.8 <= ratio <= 2.3


def test_network_macs_grow_linearly_with_pixels():
    model = build_model({"name": "segnetr"}, seed=0)
    ratio = count_macs(model, (1, 1, 64, 128)) / count_macs(model, (1, 1, 64, 64))
    assert 1.8 <= ratio <= 2.3


@pytest.mark.parametrize("channels", [[16, 32, 64, 128], [32, 64, 128, 256], [64, 128, 256, 512, 1024]])
def test_parameters_at_most_045_of_unet_at_same_widths(channels):
    segnetr = count_parameters(build_model({"name": "segnetr", "channels": channels}))
    unet = count_parameters(build_model({"name": "unet", "channels": channels}))
    assert segnetr <= 0.45 * unet


# ----------------------------------------------------------------- network
@pytest.mark.parametrize("spec,shape", [({**SMALL}, (2, 1, 37, 45)), ({**SMALL, "spatial_dims": 3, "norm": "group"}, (1, 1, 9, 10, 11))])
def test_network_output_shape(spec, shape):
    model = build_model(spec, seed=0)
    assert model(torch.randn(shape)).shape == (shape[0], 2, *shape[2:])


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match="layout"):
        build_model({**SMALL, "layout": "diagonal"})


def test_selfreg_taps_are_declared():
    model = build_model(SMALL)
    encoders, decoders, teacher = model.selfreg_features()
    assert encoders == list(model.encoders)
    assert decoders == list(model.decoders[:-1])
    assert teacher is model.decoders[-1]


@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("policy", ["fedavg", "fedbn", "silobn", "local"])
def test_partition_covers_every_key_once(norm, policy):
    model = build_model({**SMALL, "norm": norm})
    keys = set(model.state_dict())
    split = partition(model, policy)
    assert set(split.shared) | set(split.local) == keys
    assert not set(split.shared) & set(split.local)
    assert len(split.shared) + len(split.local) == len(keys)
    stats = {k for k in keys if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}
    expected_local = {
        "fedavg": set(),
        "local": keys,
        "silobn": stats,
        "fedbn": {k for k, role in split.roles.items() if role is not None},
    }[policy]
    assert set(split.local) == expected_local
    if norm == "batch" and policy in ("fedbn", "silobn"):
        assert split.local
