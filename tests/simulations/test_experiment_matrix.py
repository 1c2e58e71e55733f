"""Experiment matrix expansion and flag overrides (no federation runs here)."""

from pathlib import Path

import pytest

from shared_models.config import ConfigError, from_dict
from simulations.experiment import ExperimentConfig, load_experiment, with_overrides

MATRIX = {
    "model": {"name": "unet", "channels": [8, 16], "norm": "batch"},
    "datasets": {"synthetic": {}, "mine": {"dir": "/data/x"}},
    "models": [{"name": "unet"}, {"name": "segnetr"}],
    "norms": ["batch", "iln"],
    "methods": ["fedavg", "fedbn"],
    "arms": [{"name": "sn-fedbn", "method": "fedbn", "model": {"norm": "switchable"}, "policy-overrides": {"mixing": "local"}}],
    "seeds": [0, 1, 2],
}


def test_matrix_is_the_full_product_in_a_stable_order():
    cfg = from_dict(ExperimentConfig, MATRIX)
    cells = cfg.cells()
    assert len(cells) == 2 * 2 * 2 * 3 * 3
    assert len({(c.dataset, c.name) for c in cells}) == len(cells)  # every cell has its own folder
    first = cells[0]
    assert (first.dataset, first.label, first.seed) == ("synthetic", "fedavg-unet-batch", 0)
    assert first.model == {"name": "unet", "channels": [8, 16], "norm": "batch"}
    sn = [c for c in cells if c.arm.name == "sn-fedbn"]
    # The arm's own model override wins over the norm axis (it is what the arm studies).
    assert {c.model["norm"] for c in sn} == {"switchable"}
    assert {c.model["name"] for c in cells} == {"unet", "segnetr"}
    assert cells == cfg.cells()


def test_single_axis_values_stay_out_of_the_labels():
    cfg = load_experiment(None)
    assert [c.name for c in cfg.cells()][:2] == ["local-seed0", "local-seed1"]
    assert {c.dataset for c in cfg.cells()} == {"data"}


def test_flags_override_the_file():
    cfg = with_overrides(load_experiment(None), methods=("fedbn",), seeds=(3,), norm="iln", model_name="unet", data_dir="/x")
    assert [c.name for c in cfg.cells()] == ["fedbn-seed3"]
    assert cfg.cells()[0].model["norm"] == "iln"
    assert cfg.data.dir == "/x" and cfg.all_datasets == {"data": cfg.data}


def test_duplicate_arm_names_and_unknown_methods_are_rejected():
    with pytest.raises(ConfigError, match="duplicate arm"):
        from_dict(ExperimentConfig, {"methods": ["fedbn"], "arms": [{"method": "fedbn"}]})
    with pytest.raises(ConfigError, match="unknown method 'fedbm'"):
        from_dict(ExperimentConfig, {"arms": [{"method": "fedbm"}]})


def test_each_seed_has_its_own_split_the_same_for_every_method(tmp_path):
    from simulations.experiment import Arm, Cell, ExperimentConfig
    from simulations.run import run_config_for

    cfg = ExperimentConfig(methods=("local", "fedbn"), seeds=(0, 1), lr=3e-3, batch_size=8)
    spec = {"name": "unet", "channels": [4, 8]}

    def split(method, seed):
        cell = Cell("data", method, Arm(method), spec, seed)
        return run_config_for(cfg, cfg.data, cell, tmp_path, ["a"], tmp_path / "c")["split-seed"]

    assert split("local", 0) == split("fedbn", 0) != split("fedbn", 1) == split("local", 1)


def test_fine_tuning_methods_train_as_many_epochs_as_every_other_method():
    from simulations.methods import METHODS, finetune_budget

    for rounds, epochs in [(20, 1), (40, 2), (3, 1), (2, 1)]:
        federated, at_site = finetune_budget(METHODS["fedbn-ft"], rounds, epochs)
        assert federated >= 1 and at_site >= epochs
        assert federated * epochs + at_site == rounds * epochs
    assert finetune_budget(METHODS["fedbn-ft"], 20, 1) == (16, 4)
    assert finetune_budget(METHODS["fedbn"], 20, 1) == (20, 0)
    assert finetune_budget(METHODS["fedbn-ft"], 1, 1) == (1, 0)  # one round leaves nothing to split


def test_site_local_norms_combine_with_a_server_optimizer():
    """fedbn-avgm / fedbn-adam: FedBN's partition (norm tensors stay local) and a server optimizer on the shared ones."""
    import json as _json

    from simulations.experiment import Arm, Cell, ExperimentConfig
    from simulations.run import run_config_for

    spec = {"name": "unet", "channels": [4, 8], "norm": "batch", "spatial-dims": 2, "in-channels": 1, "out-channels": 3}
    cfg = ExperimentConfig(rounds=2, lr=3e-3, batch_size=4, device="cpu", methods=("fedbn-avgm", "fedbn-adam"), seeds=(0,))
    for method, strategy in [("fedbn-avgm", "fedavgm"), ("fedbn-adam", "fedadam"), ("fedbn", "fedavg")]:
        config = run_config_for(cfg, cfg.data, Cell("data", method, Arm(method), spec, 0), Path("/data"), ["site-a"], Path("/out"))
        assert (config["policy"], config["strategy"], _json.loads(config["strategy-options"])) == ("fedbn", strategy, {})
