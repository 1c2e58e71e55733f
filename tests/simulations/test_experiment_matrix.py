"""Experiment matrix expansion and flag overrides (no federation runs here)."""

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
