"""partition(): decided by module type, complete, and right for each policy."""

import pytest
import torch
from monai.networks.nets import BasicUNet, UNet
from torch import nn

from shared_models import build_model, partition
from shared_models.norms import TensorRole
from shared_models.partition import PartitionError, Policy

MONAI_NETS = {
    "monai-unet-batch": lambda: UNet(2, 1, 3, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm="batch"),
    "monai-unet-instance-affine": lambda: UNet(2, 1, 3, channels=(8, 16), strides=(2,), norm=("instance", {"affine": True})),
    "monai-basicunet": lambda: BasicUNet(2, 1, 3, features=(8, 8, 16, 16, 32, 8)),
    "monai-basicunet-batch": lambda: BasicUNet(3, 1, 3, features=(4, 4, 8, 8, 8, 4), norm="batch"),
}


@pytest.mark.parametrize("net", list(MONAI_NETS))
@pytest.mark.parametrize("policy", ["fedavg", "fedbn", "silobn", "local"])
def test_monai_networks_partition_without_bn_in_names(net, policy):
    model = MONAI_NETS[net]()
    split = partition(model, policy)
    keys = list(model.state_dict())
    assert sorted(split.shared + split.local) == sorted(keys)
    assert not any("bn" in k for k in keys)  # a name-based FedBN filter would find nothing here
    norm_modules = {n for n, m in model.named_modules() if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm2d))}
    norm_keys = {k for k in keys if k.rsplit(".", 1)[0] in norm_modules}
    if policy == "fedbn":
        assert norm_keys and set(split.local) == norm_keys
    if policy == "silobn":
        stats = {k for k in norm_keys if k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")}
        assert set(split.local) == stats


def test_batchnorm_unet_roles():
    model = build_model({"name": "unet", "channels": [8, 16], "norm": "batch"})
    split = partition(model, "silobn")
    assert "inc.norm0.running_mean" in split.local
    assert "inc.norm0.num_batches_tracked" in split.local
    assert "inc.norm0.weight" in split.shared
    assert split.roles["inc.norm0.weight"] is TensorRole.AFFINE
    assert split.roles["inc.conv0.weight"] is None
    fedbn = partition(model, "fedbn")
    assert "inc.norm0.weight" in fedbn.local and "inc.conv0.weight" in fedbn.shared


def test_groupnorm_has_no_statistics_so_silobn_shares_everything():
    model = build_model({"name": "unet", "channels": [8, 16], "norm": "group"})
    assert partition(model, "silobn").local == ()
    assert partition(model, "fedbn").local  # its affine stays local under FedBN


class MysteryNorm(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return x * self.scale[None, :, None, None]


class StatsKeeper(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(c))


@pytest.mark.parametrize("module", [MysteryNorm(4), StatsKeeper(4)])
def test_unregistered_norm_is_an_error_not_shared_by_default(module):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), module)
    with pytest.raises(PartitionError, match="not registered"):
        partition(model, "fedbn")


def test_policy_overrides_flip_one_role():
    pol = Policy.parse("fedbn", {"affine": "shared"})
    assert TensorRole.AFFINE not in pol.local_roles and TensorRole.STATISTIC in pol.local_roles
    model = build_model({"name": "unet", "channels": [8, 16], "norm": "batch"})
    assert partition(model, pol).local == partition(model, "silobn").local
    with pytest.raises(PartitionError, match="unknown role"):
        Policy.parse("fedbn", {"gamma": "local"})
    with pytest.raises(PartitionError, match="unknown policy"):
        Policy.parse("fedbm")


@pytest.mark.parametrize("net", list(MONAI_NETS))
@pytest.mark.parametrize("layer", ["stem", "head"])
def test_a_local_stem_or_head_adds_exactly_that_convolution_to_fedbn(net, layer):
    model = MONAI_NETS[net]()
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d))]
    expected = convs[0] if layer == "stem" else convs[-1]
    split = partition(model, Policy.parse("fedbn", {layer: "local"}))
    added = set(split.local) - set(partition(model, "fedbn").local)
    assert added and {k.rsplit(".", 1)[0] for k in added} == {expected}
    assert sorted(split.shared + split.local) == sorted(model.state_dict())
    assert partition(model, Policy.parse("fedbn", {layer: "local", **{layer: "shared"}})).local == partition(model, "fedbn").local


def test_the_project_unet_keeps_its_named_stem_and_head():
    model = build_model({"name": "unet", "channels": [8, 16], "norm": "batch"})
    both = partition(model, Policy.parse("fedbn", {"stem": "local", "head": "local"}))
    assert set(both.local) - set(partition(model, "fedbn").local) == {"stem.weight", "stem.bias", "head.weight", "head.bias"}
