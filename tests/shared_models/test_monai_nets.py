"""The MONAI adapter: registry norms in every norm slot, MONAI's own syntax passed through."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import BasicUNet, UNet
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from shared_models import build_model, partition
from shared_models.build import architecture_fingerprint
from shared_models.config import ConfigError
from shared_models.norms.iln import InstanceLayerNorm

SMALL = {
    "monai_unet": {"channels": [4, 8], "num_res_units": 1},
    "monai_basicunet": {"features": [4, 4, 4, 4, 4, 4]},
    "monai_dynunet": {"filters": [4, 4, 8]},
    "monai_segresnet": {"init_filters": 4, "blocks_down": [1, 1], "blocks_up": [1]},
    "monai_attentionunet": {"channels": [4, 8]},
}


def _same_tensors(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", list(SMALL))
def test_a_registry_norm_fills_every_norm_slot(name):
    # Prepare / Execute
    model = build_model({"name": name, "norm": "group", **SMALL[name]}, seed=0)
    # Assert
    assert not any(isinstance(m, (_BatchNorm, nn.InstanceNorm2d)) for m in model.modules())
    groups = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert groups and all(m.num_channels % m.num_groups == 0 for m in groups)
    split = partition(model, "fedbn")
    group_keys = {k for k in model.state_dict() if k.endswith((".weight", ".bias")) and split.roles[k] is not None}
    assert group_keys and group_keys == set(split.local)


@pytest.mark.parametrize("name", list(SMALL))
def test_a_composite_registry_norm_runs_in_every_monai_net(name):
    model = build_model({"name": name, "norm": "iln", **SMALL[name]}, seed=0)
    assert any(isinstance(m, InstanceLayerNorm) for m in model.modules())
    size = (32, 32) if name == "monai_basicunet" else (8, 8)
    assert model(torch.randn(2, 1, *size)).shape == (2, 2, *size)


def test_batch_name_builds_exactly_monais_own_unet():
    ours = build_model({"name": "monai_unet", "channels": [4, 8, 16], "norm": "batch"}, seed=3)
    torch.manual_seed(3)
    theirs = UNet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=2, norm="batch")
    assert _same_tensors(ours, theirs)
    assert architecture_fingerprint(ours) == architecture_fingerprint(theirs)


def test_monai_syntax_is_handed_to_monai_unchanged():
    ours = build_model({"name": "monai_basicunet", "features": [4, 4, 4, 4, 4, 4]}, seed=1)  # default ["instance", {"affine": true}]
    torch.manual_seed(1)
    theirs = BasicUNet(2, 1, 2, features=(4, 4, 4, 4, 4, 4), norm=("instance", {"affine": True}))
    assert _same_tensors(ours, theirs)
    plain = build_model({"name": "monai_unet", "channels": [4, 8], "norm": ["instance", {}]})
    assert not [k for k in plain.state_dict() if partition(plain, "fedbn").roles[k] is not None]  # MONAI's affine-free IN


ILL_CASES = [
    ({"name": "monai_unet", "norm": "bogus"}, "unknown norm 'bogus'"),
    ({"name": "monai_unet", "norm": ["batch", {}], "norm-options": {"eps": 1e-3}}, "norm-options apply"),
    ({"name": "monai_attentionunet", "norm": ["batch", {}]}, "hard-codes its norm slots"),
    ({"name": "monai_dynunet", "filters": [4, 8]}, ">= 3 levels"),
    ({"name": "monai_segresnet", "spatial_dims": 1}, "spatial-dims must be 2 or 3"),
]


@pytest.mark.parametrize("spec,message", ILL_CASES)
def test_bad_specs_fail_at_config_time_naming_the_problem(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_model(spec)
