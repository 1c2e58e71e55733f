"""simulations.planning: the plan fills only what the experiment left unset."""

from dataclasses import replace
from pathlib import Path

from server.plan import make_plan
from simulations.experiment import ExperimentConfig, load_experiment, with_overrides
from simulations.planning import GIVEN, PLANNED, apply_plan, base_experiment, merge_model
from tests.helpers import fingerprint

PLAN = make_plan([fingerprint(f"site-{s}", shape=(100, 100)) for s in "abcd"])


def test_an_unset_experiment_takes_the_whole_plan():
    cfg, sources = apply_plan(ExperimentConfig(), PLAN)
    assert cfg.model == {"name": "unet", "channels": [16, 32, 64, 128], "norm": "batch"}
    assert (cfg.lr, cfg.pooled_lr, cfg.batch_size) == (1e-2, 1e-3, 8)
    assert set(sources.values()) == {PLANNED}


def test_explicit_values_win_over_the_plan():
    given = ExperimentConfig(model={"channels": [8, 16]}, lr=0.02, batch_size=3)
    cfg, sources = apply_plan(given, PLAN)
    assert cfg.model == {"name": "unet", "channels": [8, 16], "norm": "batch"}
    assert (cfg.lr, cfg.pooled_lr, cfg.batch_size) == (0.02, None, 3)  # a given lr holds for the pooled arm too
    assert sources == {"model.name": PLANNED, "model.channels": GIVEN, "model.norm": PLANNED, "lr": GIVEN, "batch_size": GIVEN,
                       "patch_size": PLANNED, "target_spacing": PLANNED, "pooled_lr": GIVEN}
    assert (cfg.patch_size, cfg.target_spacing) == (PLAN.patch_size, PLAN.target_spacing)


def test_flags_are_explicit_values():
    flagged = with_overrides(ExperimentConfig(), norm="instance", lr=0.05, data_dir=Path("/x"))
    cfg, _ = apply_plan(flagged, PLAN)
    assert cfg.model["norm"] == "instance" and cfg.model["channels"] == [16, 32, 64, 128] and cfg.lr == 0.05
    assert cfg.batch_size == 8


def test_another_model_takes_only_the_planned_keys_it_has():
    assert merge_model({"name": "monai_unet"}, PLAN.model_spec) == {"name": "monai_unet", "channels": [16, 32, 64, 128], "norm": "batch"}
    assert merge_model({"name": "monai_basicunet"}, PLAN.model_spec).keys() == {"name", "norm"}


def test_data_without_a_yaml_is_planned_but_the_demo_keeps_its_own_sizing():
    demo = load_experiment(None)
    assert base_experiment(None, None) == demo and demo.model is not None and demo.lr is not None
    planned = base_experiment(None, Path("/data"))
    assert (planned.model, planned.lr, planned.batch_size) == (None, None, None)
    assert planned == replace(demo, name="data", model=None, lr=None, batch_size=None)  # /data does not exist: no dims


def test_a_folder_dataset_names_the_report_after_the_folder_and_its_dimensionality(tmp_path):
    import nibabel as nib
    import numpy as np

    for kind in ("images", "labels"):
        (tmp_path / "hospitals" / "a" / kind).mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.zeros((6, 6, 5), np.uint8), np.eye(4)), tmp_path / "hospitals" / "a" / kind / "c0.nii.gz")
    assert base_experiment(None, tmp_path / "hospitals").name == "hospitals-3d"


def test_the_pooled_arm_trains_at_the_pooled_lr_and_every_other_arm_at_the_lr(tmp_path):
    from simulations.experiment import Arm, Cell, DataConfig
    from simulations.run import run_config_for

    cfg, _ = apply_plan(ExperimentConfig(), PLAN)
    lrs = {}
    for method in ("pooled", "fedbn", "local"):
        cell = Cell("data", method, Arm(method), cfg.model, 0)
        lrs[method] = run_config_for(cfg, DataConfig(), cell, tmp_path, ["site-a", "site-b"], tmp_path / method)["lr"]
    assert lrs == {"pooled": 1e-3, "fedbn": 1e-2, "local": 1e-2}
