"""The simulate flags of the local recipe reach every cell's run config (and nothing given means the defaults)."""

import argparse
from pathlib import Path

from server.run_config import ServerRunConfig
from shared_models.protocol import TrainSettings
from simulations.experiment import Arm, Cell
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
