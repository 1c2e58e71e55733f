"""The simulate flags of the local recipe reach every cell's run config (and nothing given means the defaults)."""

import argparse
from pathlib import Path

import pytest

from server.run_config import ServerRunConfig
from shared_models.config import ConfigError
from shared_models.protocol import RoundConfig, TrainSettings
from simulations.experiment import Arm, Cell, load_experiment
from simulations.run import add_arguments, resolve_config, run_config_for

SPEC = {"name": "unet", "channels": [4, 8], "norm": "batch"}


def _cell_config(*flags: str) -> ServerRunConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = resolve_config(parser.parse_args(list(flags)))
    record = run_config_for(cfg, cfg.data, Cell("data", "fedbn", Arm("fedbn"), SPEC, 0), Path("/d"), ["a"], Path("/c"))
    return ServerRunConfig.from_run_config(record)


def test_recipe_flags_reach_the_cells_run_config():
    run = _cell_config("--optimizer", "sgd", "--schedule", "cosine", "--no-augment", "--reset-optimizer")
    assert (run.optimizer, run.lr_schedule, run.augment, run.persist_optimizer) == ("sgd", "cosine", False, False)
    train = run.round_config("fp").train
    assert (train.optimizer, train.schedule, train.augment, train.persist_optimizer) == ("sgd", "cosine", False, False)


def test_without_flags_the_cell_trains_with_the_contracts_recipe():
    train, default = _cell_config().round_config("fp").train, TrainSettings()
    recipe = ("optimizer", "momentum", "schedule", "warmup_fraction", "persist_optimizer", "augment")
    assert all(getattr(train, k) == getattr(default, k) for k in recipe)


def test_transport_dtype_reaches_the_round_and_defaults_to_fp32(tmp_path):
    assert _cell_config().round_config("fp").transport_dtype == "fp32"
    cfg = _cell_config("--transport-dtype", "bf16").round_config("fp")
    assert cfg.transport_dtype == "bf16"
    assert RoundConfig.from_record(cfg.to_record()).transport_dtype == "bf16"  # the site reads what the server wrote
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("methods: [fedbn]\ntransport-dtype: fp16\n")
    assert load_experiment(experiment).transport_dtype == "fp16"
    experiment.write_text("methods: [fedbn]\ntransport-dtype: fp8\n")
    with pytest.raises(ConfigError, match="transport-dtype: expected one of"):
        load_experiment(experiment)
