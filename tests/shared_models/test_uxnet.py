"""UXNet-style relaxation (methods.md §5.4), discretisation, search step, FL split."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from shared_models import build_model, partition
from shared_models.config import ConfigError
from shared_models.nets.uxnet import DecoderNode, SearchBlock, arch_parameters, weight_parameters
from shared_models.nets.uxnet_search import architecture_summary, derive_architecture, discretize, search_step

SMALL = {"name": "uxnet", "channels": [8, 16, 32]}
HOT = 1e4  # softmax of this logit gap is exactly one-hot in float32


def _one_hot(model, generator: torch.Generator) -> None:
    """Random one-hot alpha per block and beta per node (large logits)."""
    with torch.no_grad():
        for p in arch_parameters(model):
            p.zero_()
            p[torch.randint(len(p), (1,), generator=generator)] = HOT


def test_one_hot_alpha_reduces_a_mixed_op_to_that_operator_exactly():
    block = SearchBlock(["conv3", "dil_conv3", "sep_conv3", "identity"], 2, 8, "batch", {}, searchable=True).eval()
    x = torch.randn(2, 8, 12, 12)
    for k, op in enumerate(block.ops.values()):
        with torch.no_grad():
            block.alpha.zero_()
            block.alpha[k] = HOT
        assert torch.equal(block(x), op(x))


def test_softmax_weights_sum_to_one_and_gradients_reach_alpha_and_beta():
    model = build_model(SMALL, seed=0)
    with torch.no_grad():
        for p in arch_parameters(model):
            p.normal_()
    for m in model.modules():
        if isinstance(m, SearchBlock):
            assert torch.allclose(m.op_weights().sum(), torch.tensor(1.0))
        if isinstance(m, DecoderNode):
            assert torch.allclose(m.input_weights().sum(), torch.tensor(1.0))
    model(torch.randn(2, 1, 16, 16)).square().mean().backward()
    params = arch_parameters(model)
    assert len(params) == 3 + 2 + 2  # 3 encoder blocks, 2 decoder blocks, 2 nodes
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("norm,train", [("batch", False), ("group", True)])
@pytest.mark.parametrize("top_k", [1, 2])
def test_discretisation_preserves_the_output_with_one_hot_weights(norm, train, top_k):
    model = build_model({**SMALL, "norm": norm, "top_k": top_k}, seed=0).train(train)
    _one_hot(model, torch.Generator().manual_seed(3))
    fixed = discretize(model)
    x = torch.randn(2, 1, 19, 17)
    assert not arch_parameters(fixed)
    assert torch.equal(model(x), fixed(x))


def test_discretisation_follows_argmax_and_top_k():
    model = build_model({**SMALL, "top_k": 2}, seed=0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SearchBlock):
                m.alpha.copy_(torch.tensor([0.0, 0.0, 2.0, 1.0]))  # sep_conv3 wins
            if isinstance(m, DecoderNode):
                m.beta.copy_(torch.arange(len(m.beta), dtype=torch.float32))  # last two sources win
    arch = derive_architecture(model)
    assert set(arch["ops"].values()) == {"sep_conv3"}
    for name, node in ((n, m) for n, m in model.named_modules() if isinstance(m, DecoderNode)):
        sources = list(node.inputs)
        assert list(arch["inputs"][name]) == [sources[-1], sources[-2]]
        assert sum(arch["inputs"][name].values()) == pytest.approx(1.0)


def test_fixed_arch_config_rebuilds_the_discretised_net():
    model = build_model(SMALL, seed=0)
    _one_hot(model, torch.Generator().manual_seed(1))
    fixed = discretize(model)
    arch = json.loads(json.dumps(architecture_summary(model)["arch"]))  # YAML/JSON round trip
    rebuilt = build_model({**SMALL, "fixed_arch": arch})
    assert list(rebuilt.state_dict()) == list(fixed.state_dict())
    rebuilt.load_state_dict(fixed.state_dict())
    x = torch.randn(1, 1, 16, 16)
    assert torch.equal(rebuilt.eval()(x), fixed.eval()(x))


def test_bad_fixed_arch_names_the_block():
    arch = derive_architecture(build_model(SMALL))
    arch["ops"]["encoder.0.blocks.0"] = "conv7"
    with pytest.raises(ConfigError, match="encoder.0.blocks.0"):
        build_model({**SMALL, "fixed_arch": arch})


def test_architecture_summary_reports_choices_and_weights():
    model = build_model(SMALL, seed=0)
    _one_hot(model, torch.Generator().manual_seed(2))
    summary = json.loads(json.dumps(architecture_summary(model)))
    assert summary["supernet"] is True
    for name, block in summary["blocks"].items():
        assert block["chosen"] == max(block["weights"], key=block["weights"].get)
        assert summary["arch"]["ops"][name] == block["chosen"]
    for node in summary["nodes"].values():
        assert sum(node["weights"].values()) == pytest.approx(1.0)
        assert len(node["top"]) == 2


def test_search_step_updates_alpha_on_val_and_weights_on_train():
    model = build_model(SMALL, seed=0)
    w_opt = torch.optim.SGD(weight_parameters(model), lr=0.1)
    a_opt = torch.optim.Adam(arch_parameters(model), lr=0.1)
    batch = (torch.randn(2, 1, 16, 16), torch.randint(0, 2, (2, 16, 16)))
    before_a = [p.detach().clone() for p in arch_parameters(model)]
    before_w = [p.detach().clone() for p in weight_parameters(model)]
    out = search_step(model, batch, batch, F.cross_entropy, w_opt, a_opt)
    assert set(out) == {"train_loss", "val_loss"}
    assert all(not torch.equal(b, p) for b, p in zip(before_a, arch_parameters(model)))
    assert any(not torch.equal(b, p) for b, p in zip(before_w, weight_parameters(model)))
    assert all(p.grad is None for p in model.parameters())


def test_arch_and_weight_parameters_partition_the_parameters():
    model = build_model(SMALL)
    ids = [id(p) for p in arch_parameters(model)] + [id(p) for p in weight_parameters(model)]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())


def test_3d_supernet_runs_with_the_3d_candidates():
    model = build_model({**SMALL, "spatial_dims": 3, "norm": "group"}, seed=0)
    assert "p3d" in model.encoder[0].blocks[0].ops
    assert model(torch.randn(1, 1, 8, 9, 10)).shape == (1, 2, 8, 9, 10)


def test_selfreg_taps_are_declared():
    model = build_model(SMALL)
    encoders, decoders, teacher = model.selfreg_features()
    assert encoders == list(model.encoder[1:])
    assert decoders == list(model.decoder[:-1])
    assert teacher is model.decoder[-1]


@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("policy", ["fedavg", "fedbn", "silobn", "local"])
@pytest.mark.parametrize("supernet", [True, False])
def test_partition_covers_every_key_once(norm, policy, supernet):
    model = build_model({**SMALL, "norm": norm}, seed=0)
    if not supernet:
        model = discretize(model)
    keys = list(model.state_dict())
    split = partition(model, policy)
    assert sorted(split.shared + split.local) == sorted(keys)
    assert len(set(split.shared) | set(split.local)) == len(keys)
    arch_keys = {k for k in keys if k.endswith((".alpha", ".beta"))}
    assert bool(arch_keys) == supernet
    # FL decision: alpha/beta are ordinary weights, aggregated unless the policy is "local"
    assert arch_keys <= set(split.local if policy == "local" else split.shared)
    if norm == "batch" and policy in ("fedbn", "silobn"):
        assert split.local


def test_discretize_does_not_touch_the_supernet():
    model = build_model(SMALL, seed=0)
    state = copy.deepcopy(model.state_dict())
    discretize(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------- federated search (trainer hook)
def _adam_step(model):
    """The trainer's ``step``: backward + Adam over *all* parameters + zero_grad."""
    opt = torch.optim.Adam(model.parameters(), lr=0.05)

    def step(loss, clip_value=None):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _seg_batch(n=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 2, (n, 16, 16), generator=g)


def test_training_step_moves_alpha_and_weights():
    model = build_model(SMALL, seed=0).train()
    before_a = [p.detach().clone() for p in arch_parameters(model)]
    before_w = [p.detach().clone() for p in weight_parameters(model)]
    loss = model.training_step(*_seg_batch(), F.cross_entropy, _adam_step(model))
    assert loss.dim() == 0 and not loss.requires_grad
    assert all(not torch.equal(b, p) for b, p in zip(before_a, arch_parameters(model)))
    assert any(not torch.equal(b, p) for b, p in zip(before_w, weight_parameters(model)))
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_the_weight_step_does_not_move_alpha_even_with_adam_over_all_parameters():
    # arch-lr 0: any change of alpha/beta could only come from the trainer's Adam (incl. weight decay)
    from client.trainer import TrainSettings, train_local

    model = build_model({**SMALL, "arch_lr": 0.0, "arch_weight_decay": 0.0}, seed=0)
    before_a = [p.detach().clone() for p in arch_parameters(model)]
    before_w = [p.detach().clone() for p in weight_parameters(model)]
    images, labels = _seg_batch(8)
    report = train_local(model, images, labels.unsqueeze(1), TrainSettings(epochs=2, batch_size=4, weight_decay=0.1),
                         lambda out, y: F.cross_entropy(out, y.squeeze(1)))
    assert report.steps == 4
    assert all(torch.equal(b, p) for b, p in zip(before_a, arch_parameters(model)))
    assert any(not torch.equal(b, p) for b, p in zip(before_w, weight_parameters(model)))


def test_arch_optimizer_stays_out_of_state_dict_and_fingerprint_and_survives_pickle():
    import pickle

    from shared_models import architecture_fingerprint

    model = build_model(SMALL, seed=0)
    keys, fingerprint = list(model.state_dict()), architecture_fingerprint(model)
    model.training_step(*_seg_batch(), F.cross_entropy, _adam_step(model))
    assert isinstance(model.__dict__.get("_arch_opt"), torch.optim.Adam)
    assert list(model.state_dict()) == keys and architecture_fingerprint(model) == fingerprint
    assert not any("opt" in k for k in model.state_dict())
    clone = pickle.loads(pickle.dumps(model))  # simulation workers
    assert clone.training_step.__self__ is clone
    opt = clone._arch_optimizer(arch_parameters(clone))
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in arch_parameters(clone)}


def test_search_false_keeps_alpha_fixed_and_uses_the_plain_step():
    from client.trainer import TrainSettings, train_local

    model = build_model({**SMALL, "search": False}, seed=0)
    assert not hasattr(model, "training_step")
    before_a = [p.detach().clone() for p in arch_parameters(model)]
    images, labels = _seg_batch(8)
    train_local(model, images, labels.unsqueeze(1), TrainSettings(epochs=1, batch_size=4), lambda out, y: F.cross_entropy(out, y.squeeze(1)))
    assert all(torch.equal(b, p) for b, p in zip(before_a, arch_parameters(model)))
    # same tensors as the searching supernet: a model-schedule may switch search on
    from shared_models import architecture_fingerprint

    assert architecture_fingerprint(model) == architecture_fingerprint(build_model(SMALL, seed=0))


def test_discretised_net_has_no_search_step_and_accepts_selfreg():
    from shared_models.losses import make_loss

    fixed = discretize(build_model(SMALL, seed=0))
    assert not hasattr(fixed, "training_step")
    make_loss("selfreg", fixed)
    with pytest.raises(ValueError, match="already defines training_step"):
        make_loss("selfreg", build_model(SMALL, seed=0))


def test_one_sample_batch_serves_both_updates():
    model = build_model({**SMALL, "norm": "group"}, seed=0)
    before_a = [p.detach().clone() for p in arch_parameters(model)]
    model.training_step(*_seg_batch(1), F.cross_entropy, _adam_step(model))
    assert all(not torch.equal(b, p) for b, p in zip(before_a, arch_parameters(model)))


def test_keep_decoder_chain_keeps_every_decoder_node_alive():
    import torch

    from shared_models import build_model
    from shared_models.nets.uxnet import DecoderNode
    from shared_models.nets.uxnet_search import derive_architecture

    for keep in (False, True):
        model = build_model({"name": "uxnet", "channels": [4, 8, 16], "keep-decoder-chain": keep}, seed=0)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, DecoderNode):  # favour every input except the next-coarser one
                    m.beta.fill_(5.0)
                    m.beta[1] = -5.0
        arch = derive_architecture(model)
        for name, m in model.named_modules():
            if isinstance(m, DecoderNode):
                kept = list(arch["inputs"][name])
                assert len(kept) == model.config.top_k
                assert (list(m.inputs)[1] in kept) == keep
